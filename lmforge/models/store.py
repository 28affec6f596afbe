"""Save and load any lmforge model: `config.json` (dataclasses.asdict(ModelConfig)) + `model.safetensors`.

Weights go through safetensors only (never pickle). Tied parameters (a GPT head sharing the token
embedding, BERT's MLM decoder) are stored once, under the first name `state_dict()` gives them;
the model re-ties them when it is built. `config.json`'s `family` picks the class from FAMILIES
(import strings, so `bert` is imported only when a BERT is loaded).

    >>> save_model(model, "runs/x")            # runs/x/config.json, runs/x/model.safetensors
    >>> model = load_model("runs/x", dtype=torch.bfloat16)
"""

from __future__ import annotations

import dataclasses
import importlib
import json
from pathlib import Path

import torch
import torch.nn as nn

from lmforge.config import ModelConfig, from_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write_bytes, atomic_write_json
from lmforge.models.convert_config import is_hf_dir

FAMILIES: dict[str, str] = {
    "gpt": "lmforge.models.gpt:GPT",
    "bert": "lmforge.models.bert:BertForPreTraining",
}
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def model_class(family: str) -> type[nn.Module]:
    """'gpt' -> lmforge.models.gpt.GPT (imported lazily)."""
    if family not in FAMILIES:
        raise CheckpointError(f"unknown model family {family!r}; known: {', '.join(FAMILIES)}")
    module, name = FAMILIES[family].split(":")
    return getattr(importlib.import_module(module), name)


def build_model(cfg: ModelConfig) -> nn.Module:
    return model_class(cfg.family)(cfg)


def unique_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """state_dict() with every tensor that shares storage with an earlier one left out (tied weights)."""
    seen: set[tuple] = set()
    out = {}
    for name, t in model.state_dict().items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride())
        if key in seen:
            continue
        seen.add(key)
        out[name] = t
    return out


def save_model(model: nn.Module, out_dir: str | Path) -> Path:
    """Write out_dir/config.json and out_dir/model.safetensors (each atomically)."""
    from safetensors.torch import save

    out_dir = Path(out_dir)
    tensors = {k: v.detach().contiguous().cpu() for k, v in unique_state_dict(model).items()}
    atomic_write_bytes(out_dir / WEIGHTS_FILE, save(tensors, metadata={"format": "pt"}))
    atomic_write_json(out_dir / CONFIG_FILE, dataclasses.asdict(model.cfg))
    return out_dir


def load_config_json(run_dir: str | Path) -> ModelConfig:
    """Read run_dir/config.json into a ModelConfig, with CheckpointErrors that name the file."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise CheckpointError(
            f"{run_dir} {'is not a directory' if run_dir.exists() else 'does not exist'}; give a run dir "
            f"holding {CONFIG_FILE} + {WEIGHTS_FILE}"
        )
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{path} is missing; a run dir needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    if is_hf_dir(run_dir):
        raise CheckpointError(f"{run_dir} is a Hugging Face folder, not an lmforge run dir; import it with "
                              f"`lmforge convert --from-hf {run_dir} OUT` or load it with lmforge.load")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}); restore it from a checkpoint") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object (the model config); restore it from a "
                              "checkpoint")
    try:
        return from_dict(ModelConfig, data, prefix="model.")
    except ConfigError as e:
        raise CheckpointError(f"{path}: {e}") from None


def check_size(cfg, n_weights: int, wpath: str | Path) -> None:
    """Refuse, before building anything, a config that needs more weights than the file holds (an edited
    or mismatched config.json with, say, a million layers would otherwise allocate them first)."""
    least = cfg.n_layer * 2 * cfg.d_model**2 + cfg.vocab_size * cfg.d_model  # attention q + o, embedding
    if least > n_weights:
        raise CheckpointError(f"config.json describes a model of at least {least:,} weights but {wpath} "
                              f"holds {n_weights:,}; the weights do not match config.json")


def load_model(run_dir: str | Path, device: str | torch.device = "cpu",
               dtype: str | torch.dtype | None = None) -> nn.Module:
    """Build the model that run_dir/config.json describes and fill it from model.safetensors.

    Every tensor must be present with its shape; extra tensors are an error too (named).
    dtype: None (fp32) | "fp32" | "bf16" | "fp16" | a torch.dtype.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if dtype is not None and not isinstance(dtype, torch.dtype):
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise ConfigError(f"dtype {dtype!r} is not valid; choose one of: {', '.join(DTYPES)} "
                              "or a torch.dtype")
        dtype = DTYPES[dtype]
    run_dir = Path(run_dir)
    cfg = load_config_json(run_dir)
    wpath = run_dir / WEIGHTS_FILE
    if not wpath.is_file():
        raise CheckpointError(f"{wpath} is missing; save the model with save_model() or re-run training")
    try:
        tensors = load_file(wpath, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(
            f"{wpath} is not a readable safetensors file ({e}); it may be truncated"
        ) from None
    check_size(cfg, sum(t.numel() for t in tensors.values()), wpath)
    try:
        model = build_model(cfg)
    except (RuntimeError, MemoryError) as e:  # e.g. a max_seq_len whose RoPE tables cannot be allocated
        raise CheckpointError(f"{run_dir / CONFIG_FILE} describes a model that cannot be built here "
                              f"({str(e).splitlines()[0][:120]}); check config.json") from None
    expected = unique_state_dict(model)
    missing = [k for k in expected if k not in tensors]
    unexpected = [k for k in tensors if k not in expected]
    if missing:
        raise CheckpointError(f"{wpath} lacks tensor {missing[0]!r} ({len(missing)} missing); "
                              "the weights do not match config.json")
    if unexpected:
        raise CheckpointError(f"{wpath} has unexpected tensor {unexpected[0]!r} ({len(unexpected)} extra); "
                              "the weights do not match config.json")
    for k, t in expected.items():
        if tuple(tensors[k].shape) != tuple(t.shape):
            raise CheckpointError(
                f"{wpath}: tensor {k!r} has shape {tuple(tensors[k].shape)} but config.json "
                f"implies {tuple(t.shape)}; the weights do not match config.json"
            )
    with torch.no_grad():
        for k, t in expected.items():
            t.copy_(tensors[k])
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
