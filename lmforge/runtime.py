"""Device, precision and seeding helpers shared by training, generation and benchmarks."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

from lmforge.errors import ConfigError


def pick_device(name: str = "auto", flag: str = "--train.device") -> torch.device:
    """'auto' -> cuda if available else cpu; 'cuda:1' -> that device (error if absent, naming `flag`)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for but CUDA is not available; use {flag}=cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device {name!r} is not valid; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        raise ConfigError(f"device {name!r} asked for but this machine has {n} CUDA device(s) "
                          f"(cuda:0..cuda:{n - 1}); use {flag}=cuda:0")
    return device


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
    # CPU: threads * GHz * FLOPs/cycle/core, AVX-512 figures: fp32 FMA 2 units * 16 lanes * 2 = 64;
    # bf16 dot products (avx512_bf16 VDPBF16PS) 4x that. A 2-core AVX-512 EPYC reaches ~950 GFLOP/s
    # in a bf16 GEMM, 74% of this 1.28 TFLOP/s (benchmarks/RESULTS.md). AMX would be higher still.
    cores = torch.get_num_threads()
    ghz = 2.5
    per_cycle = 64 if dtype == "fp32" else 256
    return cores * ghz * 1e9 * per_cycle


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed memory for reuse instead of handing it back to the kernel.

    A CPU training step allocates hundreds of MB of activations and frees them all at its end. By
    default glibc serves large blocks with mmap and returns them (munmap, heap trimming), so the next
    step page-faults every page of them back in: ~75k faults per step for gpt-small, 20-25% of the
    step (benchmarks/RESULTS.md). Raising the mmap threshold and disabling trimming makes every block
    come from the heap and stay there: the process keeps its peak memory, which a training run
    reaches anyway. The Trainer calls this on CPU (train.keep_freed_memory, default on).
    Process-wide; returns False where it does not apply (not glibc) or was refused.
    """
    import ctypes
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    ok = libc.mallopt(m_mmap_threshold, 1 << 30)  # blocks up to 1 GiB come from the heap
    ok &= libc.mallopt(m_trim_threshold, 2**31 - 1)  # never give the heap's free top back
    return bool(ok)
