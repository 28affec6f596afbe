"""The Python convenience API: text in, text out.

    >>> from lmforge import api
    >>> model, tok = api.load("runs/small")                     # a run dir (or a checkpoint folder)
    >>> api.generate(model, tok, "Once upon a time", max_new_tokens=40, temperature=0.8, top_k=50, seed=0)
    ' there was a little girl who ...'
    >>> api.generate(model, tok, ["Hello", "The sea"], temperature=0, stop=["\\n"])   # a batch
    [' world ...', ' is ...']

Keyword arguments of `generate` are the fields of `lmforge.config.GenerateConfig`.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from lmforge.config import GenerateConfig, from_dict
from lmforge.errors import CheckpointError, ConfigError
from lmforge.generate import TextStream
from lmforge.generate import generate as generate_ids
from lmforge.models.store import DTYPES, load_model
from lmforge.tokenizer import Tokenizer

_DTYPES = {**DTYPES, "int8": None}  # int8: weight-only quantized Linears (inference), fp32 loaded first


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} is not valid; choose one of: {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _finish(model: torch.nn.Module, dtype: str | torch.dtype | None, pack: bool) -> torch.nn.Module:
    from lmforge.models.layers import pack_linears_, quantize_int8_

    if dtype == "int8":  # weight-only int8 Linear layers + bf16 activations, for fast CPU decoding
        model = quantize_int8_(model)
    elif pack:
        pack_linears_(model)
    return model.eval()


def load(path: str | Path, device: str | torch.device = "cpu", dtype: str | torch.dtype | None = None,
         pack: bool = False, need_tokenizer: bool = False) -> tuple[torch.nn.Module, Tokenizer | None]:
    """A run dir (config.json + model.safetensors + tokenizer.json) -> (model in eval mode, tokenizer).

    device: "cpu" (default) | "auto" | "cuda" | "cuda:N" | a torch.device.
    dtype: None (as saved, fp32) | "fp32" | "bf16" | "fp16" | a torch.dtype | "int8" (weight-only
    int8 Linear layers with bf16 activations: inference only, ~4x less weight memory traffic).
    pack: on CPU, pre-pack every Linear weight for oneDNN (`layers.PackedLinear`): generation ~2x
    faster, but the model becomes inference-only (no parameters in its Linears, not movable to a
    GPU, not saveable). `lmforge generate` does this; leave it off to fine-tune, save or export.

    A Hugging Face folder (config.json with model_type) is read in memory through
    `lmforge.models.convert.load_hf(path, device, dtype) -> (model, tokenizer)`; its tokenizer is None
    when the folder has no tokenizer files, which is a CheckpointError with need_tokenizer=True.
    Either way, for a decoder, the eos ids the folder's config.json / generation_config.json name join
    the tokenizer's `eos_ids`, where generation stops (`stop_ids`).
    """
    from lmforge.models import convert
    from lmforge.runtime import pick_device

    if isinstance(device, str):  # "tpu", or "cuda" without CUDA: a ConfigError before any file is read
        device = pick_device(device, flag="device")
    path = Path(path)
    if convert.is_hf_dir(path):
        model, tok = convert.load_hf(path, device=device, dtype=_dtype(dtype))
        if tok is None and need_tokenizer:
            raise CheckpointError(f"{path} has no tokenizer (tokenizer.json, vocab.txt or vocab.json + "
                                  "merges.txt); copy the model's tokenizer files into it")
        model = _finish(model, dtype, pack)
    else:
        model = _finish(load_model(path, device=device, dtype=_dtype(dtype)), dtype, pack)
        if not (path / "tokenizer.json").is_file():
            raise CheckpointError(f"{path / 'tokenizer.json'} is missing; copy the tokenizer used for "
                                  "training into the run dir")
        tok = Tokenizer.load(path / "tokenizer.json")
        convert.check_tokenizer_fits(path, tok.vocab_size, model.cfg.vocab_size)
    if tok is not None and model.cfg.family == "gpt":  # e.g. an instruct model's end-of-turn id
        tok.add_eos_ids(convert.eos_ids(path))
    return model, tok


def generate(model: torch.nn.Module, tokenizer: Tokenizer, prompt: str | list[str], **kw) -> str | list[str]:
    """Continue `prompt` (or each of a list of prompts, batched); return only the new text.

    kw: max_new_tokens, temperature (0 = greedy), top_k, top_p, repetition_penalty,
    stop (strings: the output is cut before the first one and decoding of that row ends), seed.
    """
    if getattr(model.cfg, "family", "gpt") != "gpt":
        raise ConfigError(f"generate needs a gpt model, got family {model.cfg.family!r}")
    if tokenizer is None:
        raise ConfigError("generate needs a tokenizer, and the folder had no tokenizer.json; put one beside "
                          "the weights or load one with Tokenizer.load(path)")
    gc = from_dict(GenerateConfig, kw, prefix="generate.")
    texts = [prompt] if isinstance(prompt, str) else list(prompt)
    ids = [tokenizer.encode_prompt(t) for t in texts]
    streams = [TextStream(tokenizer, gc.stop, prefix_ids=p) for p in ids]
    opts = {k: v for k, v in dataclasses.asdict(gc).items() if k != "stop"}
    current = [0]  # generate() calls on_token(i, t) and then stop(row i's ids) for the same row

    def on_token(i: int, t: int) -> None:
        current[0] = i
        streams[i].push(t)

    generate_ids(
        model, ids, **opts, eos_id=tokenizer.stop_ids, pad_id=tokenizer.pad_id or 0,
        vocab_size=tokenizer.vocab_size,  # a padded embedding table's extra rows are never sampled
        stop=(lambda _row: streams[current[0]].stopped) if gc.stop else None, on_token=on_token,
    )
    outs = [s.finish() for s in streams]
    return outs[0] if isinstance(prompt, str) else outs
