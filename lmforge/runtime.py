"""Device, precision and seeding helpers shared by training, generation and benchmarks."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from lmforge.errors import ConfigError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda:1' -> that device (error if absent)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use --train.device=cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not valid; use auto, cpu, cuda or cuda:N") from None


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on CPU or GPU; a no-op context for fp32."""
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def peak_flops(device: torch.device, dtype: str) -> float:
    """Best-effort dense peak FLOP/s of one device, for MFU. Override with --train.peak_flops."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        table = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12, "A10": 125e12, "4090": 165e12}
        for key, val in table.items():
            if key in name:
                return val if dtype == "bf16" else val / 2  # tf32 path is roughly half
        return 100e12
    # CPU: cores * GHz * FLOPs/cycle. AVX-512 fp32 FMA: 2 units * 16 lanes * 2 = 64 FLOP/cycle;
    # AMX-bf16 is much higher (~1024 FLOP/cycle/core) but rarely reached; we use the AVX-512 figure.
    cores = torch.get_num_threads()
    ghz = 2.5
    per_cycle = 64 if dtype == "fp32" else 128
    return cores * ghz * 1e9 * per_cycle
