"""Hugging Face import / export: weights files, run dirs and HF folders, both ways.

    $ lmforge convert --from-hf HF_DIR OUT_RUN_DIR   # HF folder -> run dir (config.json, weights, tokenizer)
    $ lmforge convert --to-hf RUN_DIR OUT_HF_DIR     # run dir -> folder transformers' from_pretrained loads

Supported architectures (HF `architectures[0]`, else `model_type`):
    GPT2LMHeadModel                          -> gpt, GPT-2 flavour (Conv1D weights are transposed)
    LlamaForCausalLM                         -> gpt, Llama flavour (GQA, tied or untied head)
    BertModel | BertForMaskedLM | BertForPreTraining -> bert (with or without the `bert.` prefix;
                                                a head-less checkpoint imports as a backbone)
Weights are read from model.safetensors, a sharded model.safetensors.index.json, or pytorch_model.bin
(also sharded) through `torch.load(weights_only=True)`, never unsafe unpickling. Every HF tensor must
map onto ours with the right shape: missing, unexpected and mis-shaped tensors are CheckpointErrors
naming the tensor. Outputs appear atomically (io.atomic_dir): complete or not at all.

Config translation (config.json <-> ModelConfig) lives in convert_config.py, tokenizers in
convert_tokenizer.py, the parameter-name rules (the only place HF parameter names appear) in
convert_names.py; this file runs those rules over state dicts and reads and writes the folders.

    >>> model, tok = load_hf("hf/all-MiniLM-L6-v2")            # in memory, no run dir written
    >>> cfg, state_dict, tok = read_hf("hf/llama")              # the parts, before any model is built
    >>> import_hf("hf/llama", "runs/llama"); export_hf("runs/llama", "hf/llama-again")
"""

from __future__ import annotations

import argparse
import pickle
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.io import atomic_dir, atomic_write_json, follow_umask
from lmforge.models import convert_tokenizer
from lmforge.models.convert_config import (
    ARCHITECTURES,
    BERT_HEADS,
    DEFAULT_ARCH,
    config_from_hf,
    config_to_hf,
    default_arch,
    eos_ids,
    flavour_of,
    hf_architecture,
    is_hf_dir,
    read_hf_config,
    read_json,
    supported,
)
from lmforge.models.convert_names import (
    _add_redundant,
    _bert_heads,
    _canonical,
    _drop_redundant,
    _hf_prefix,
    _hf_shapes,
    _rules,
    _split_sizes,
)

if TYPE_CHECKING:
    from lmforge.tokenizer import Tokenizer

__all__ = ["ARCHITECTURES", "DEFAULT_ARCH", "config_from_hf", "config_to_hf", "default_arch", "export_hf",
           "from_hf_state_dict", "import_hf", "is_hf_dir", "load_hf", "read_hf", "read_hf_config",
           "read_hf_weights", "supported", "to_hf_state_dict"]


# ---------------------------------------------------------------------------------------------
# reading weights


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e}); re-download it") from None


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    try:
        with path.open("rb") as f:
            head = f.read(4)
    except OSError as e:
        raise CheckpointError(f"cannot read {path} ({e.strerror or type(e).__name__})") from None
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save's zip, or its older raw pickle
        raise CheckpointError(f"{path} is not a PyTorch weights file (its first bytes are {head!r}: a "
                              "git-lfs pointer or a saved web page?); re-download it")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} holds objects other than tensors, which lmforge will not unpickle; convert it to "
            "safetensors with a tool you trust"
        ) from None
    except Exception as e:  # a damaged file fails anywhere in torch.load: KeyError, struct.error, EOFError...
        why = f"{type(e).__name__}: {e}".splitlines()[0]
        raise CheckpointError(f"{path} is not a readable PyTorch weights file ({why}); re-download") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{path} is not a state dict (name -> tensor); give the model's weights file")
    return sd


def read_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of an HF folder: model.safetensors, sharded safetensors, pytorch_model.bin (+ shards)."""
    hf_dir = Path(hf_dir)
    for name, loader in (("model.safetensors", _load_safetensors), ("pytorch_model.bin", _load_bin)):
        if (hf_dir / name).is_file():
            return loader(hf_dir / name)
        index = hf_dir / f"{name}.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index} has no weight_map of tensor name -> shard file name; "
                                      "re-download the checkpoint")
            out: dict[str, torch.Tensor] = {}
            for shard in sorted(set(weight_map.values())):
                if not (hf_dir / shard).is_file():
                    raise CheckpointError(f"{index} names shard {shard} but it is missing; re-download it")
                out.update(loader(hf_dir / shard))
            return out
    raise CheckpointError(
        f"{hf_dir} has no weights; expected model.safetensors, model.safetensors.index.json or "
        "pytorch_model.bin"
    )


# ---------------------------------------------------------------------------------------------
# state dicts: the rule tables of convert_names.py, run forwards (import) and backwards (export)


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str,
                       expected: dict[str, torch.Size] | None = None) -> dict[str, torch.Tensor]:
    """HF tensors -> our state dict (unique names only; tied weights once).

    arch: the HF class ('LlamaForCausalLM', ...) or flavour ('gpt2' | 'llama' | 'bert'); cfg from
    config_from_hf (for BERT, cfg.heads must match the heads the tensors carry). `expected` (our name ->
    shape, default: from a model built on the meta device) is checked so that a shape error names the
    HF tensor. Missing and unexpected HF tensors raise CheckpointError.

        >>> ours = from_hf_state_dict(hf_model.state_dict(), config_from_hf(hf_config_dict), "gpt2")
    """
    flavour = ARCHITECTURES.get(arch, arch)
    sd = _drop_redundant(_canonical(hf_sd, flavour), cfg)
    rules = _rules(cfg, flavour)
    wanted = {name for r in rules for name in r.hf}
    missing = [n for r in rules for n in r.hf if n not in sd]
    if missing:
        raise CheckpointError(f"checkpoint lacks tensor {missing[0]!r} ({len(missing)} missing); "
                              "it does not match its config.json")
    unexpected = sorted(k for k in sd if k not in wanted)
    if unexpected:
        raise CheckpointError(f"checkpoint has unexpected tensor {unexpected[0]!r} ({len(unexpected)} more); "
                              "the weights do not match config.json")
    expected = expected if expected is not None else _our_shapes(cfg)
    out = {}
    for r in rules:
        parts = [sd[n] for n in r.hf]
        if r.ours not in expected:
            raise CheckpointError(f"internal: no parameter {r.ours!r} in our model for {r.hf[0]!r}")
        want = _hf_shapes(r, expected[r.ours], cfg)
        for name, t, shape in zip(r.hf, parts, want):
            if tuple(t.shape) != tuple(shape):
                raise CheckpointError(f"tensor {name!r} has shape {tuple(t.shape)} but config.json implies "
                                      f"{tuple(shape)}; the weights do not match config.json")
        if r.how == "T":
            out[r.ours] = parts[0].t().contiguous()
        elif r.how == "cat":
            out[r.ours] = torch.cat(parts, dim=0)
        else:
            out[r.ours] = parts[0]
    return out


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig, arch: str | None = None
                     ) -> dict[str, torch.Tensor]:
    """Our state dict -> HF tensor names of `arch` (default: the natural class for this config)."""
    flavour = flavour_of(cfg)
    arch = arch or default_arch(cfg)
    if ARCHITECTURES.get(arch) != flavour or (flavour == "bert" and BERT_HEADS[arch] != cfg.heads):
        raise CheckpointError(f"this model cannot be written as {arch}; it is a {default_arch(cfg)}")
    out: dict[str, torch.Tensor] = {}
    for r in _rules(cfg, flavour):
        if r.ours not in sd:
            raise CheckpointError(f"model weights lack tensor {r.ours!r}; they do not match config.json")
        t = sd[r.ours]
        if r.how == "T":
            parts = [t.t()]
        elif r.how == "cat":
            parts = list(t.split(_split_sizes(cfg, r), dim=0))
        else:
            parts = [t]
        for name, p in zip(r.hf, parts):
            out[name] = p.contiguous()
    return _hf_prefix(_add_redundant(out, cfg), arch)


def _our_shapes(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Our parameter shapes for `cfg`, from a model built on the meta device (no memory, no init cost)."""
    from lmforge.models.store import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    # named_parameters() lists a tied tensor once, under its first name (as store.unique_state_dict);
    # storage pointers cannot tell meta tensors apart, so the store's helper is not used here
    unique = dict(model.named_parameters())
    every = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    return {k: v.shape for k, v in model.state_dict().items() if k in unique or k not in every}


# ---------------------------------------------------------------------------------------------
# folders: import, export, load


def read_hf(hf_dir: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor], Tokenizer | None]:
    """An HF folder as (our ModelConfig, our state dict, lmforge Tokenizer or None), writing nothing.

    The state dict holds each tied tensor once (as store.unique_state_dict): load it into
    `store.build_model(cfg)` with strict=False; every other tensor was checked here."""
    from dataclasses import replace

    from lmforge.models.store import check_size
    from lmforge.tokenizer import Tokenizer

    _refuse_run_dir(Path(hf_dir))
    hf = read_hf_config(hf_dir)
    flavour = ARCHITECTURES[hf_architecture(hf)]
    cfg = config_from_hf(hf)
    weights = read_hf_weights(hf_dir)
    check_size(cfg, sum(t.numel() for t in weights.values()), Path(hf_dir))  # before any per-layer work
    if flavour == "bert":
        cfg = replace(cfg, heads=_bert_heads(_canonical(weights, flavour)))
    sd = from_hf_state_dict(weights, cfg, flavour)
    tok = convert_tokenizer.tokenizer_from_hf(hf_dir)
    if tok is not None:
        check_tokenizer_fits(hf_dir, tok.get_vocab_size(with_added_tokens=True), cfg.vocab_size)
    return cfg, sd, (Tokenizer(tok) if tok is not None else None)


def _refuse_run_dir(folder: Path) -> None:
    """An lmforge run dir or checkpoint (run.yaml, checkpoints/, or our config.json with its `family`)
    given where an HF folder belongs: say so, and how to export it (the mirror of _read_run's check)."""
    if is_hf_dir(folder) or not folder.is_dir():
        return
    cfg = folder / "config.json"
    if ((folder / "run.yaml").is_file() or (folder / "checkpoints").is_dir()
            or (cfg.is_file() and "family" in read_json(cfg))):
        raise CheckpointError(f"{folder} is an lmforge run dir, not a Hugging Face folder; to export it use "
                              f"`lmforge convert --to-hf {folder} OUT`")


def check_tokenizer_fits(folder: str | Path, n_ids: int, vocab_size: int) -> None:
    """A tokenizer of `n_ids` ids must give only ids the model's embedding has (import, export, load)."""
    if n_ids > vocab_size:
        raise CheckpointError(f"{folder}: the tokenizer has {n_ids} ids but the model's vocab_size is "
                              f"{vocab_size}; the tokenizer belongs to another model")


def load_hf(hf_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
    """An HF folder as (our model in eval mode, lmforge Tokenizer or None), without writing anything."""
    from lmforge.models.store import build_model

    cfg, sd, tok = read_hf(hf_dir)
    model = build_model(cfg)
    model.load_state_dict(sd, strict=False)  # tied copies are absent; from_hf_state_dict checked the rest
    model = model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)
    return model.eval(), tok


def _check_out(out_dir: Path, force: bool, src: str | Path) -> None:
    out, source = out_dir.resolve(), Path(src).resolve()  # --force replaces OUT_DIR: never the source
    if out == source or (source in out.parents and out.exists()):  # a new folder inside it is harmless
        raise CheckpointError(f"OUT_DIR {out_dir} is the folder being converted (or inside it); choose "
                              "another output folder")
    if out in source.parents:
        raise CheckpointError(f"OUT_DIR {out_dir} holds the folder being converted ({src}); choose "
                              "another output folder")
    if out_dir.exists() and not out_dir.is_dir():
        raise CheckpointError(f"{out_dir} is a file, not a folder; choose a new folder for the output")
    for parent in out_dir.parents:
        if parent.exists() and not parent.is_dir():
            raise CheckpointError(f"{parent} is a file, so {out_dir} cannot be made; choose another folder "
                                  "for the output")
    if out_dir.exists() and any(out_dir.iterdir()) and not force:
        raise CheckpointError(f"{out_dir} exists and is not empty; choose a new folder or pass --force")
    # --force deletes OUT_DIR: only a model folder (config.json + weights, as convert writes them) or an
    # lmforge run, never a folder of the user's that happens to be named; as `pretrain --overwrite` decides
    from lmforge.data.readers import lmforge_output

    if (out_dir.exists() and any(out_dir.iterdir())
            and not lmforge_output(out_dir).startswith(("a run dir", "a model folder"))):
        raise CheckpointError(f"--force: {out_dir} does not look like a model folder (no config.json + "
                              "weights, no run.yaml); refusing to delete it, choose another folder")


def import_hf(hf_dir: str | Path, out_dir: str | Path, force: bool = False) -> ModelConfig:
    """HF folder -> our run dir: config.json (our ModelConfig), model.safetensors, tokenizer.json, and
    generation_config.json with the folder's eos ids when it names any (`eos_ids`).

    A folder without a tokenizer still imports (weights only), with a warning on stderr: the run dir
    then has no tokenizer.json until one is copied in."""
    from dataclasses import asdict

    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    _check_out(out_dir, force, hf_dir)
    cfg, sd, tok = read_hf(hf_dir)
    arch = hf_architecture(read_hf_config(hf_dir))
    # e.g. an instruct model's end-of-turn token: generate stops there too (encoders never generate)
    stop = eos_ids(hf_dir) if cfg.family == "gpt" else []
    with atomic_dir(out_dir) as tmp:
        save_file({k: v.contiguous() for k, v in sd.items()}, tmp / "model.safetensors",
                  metadata={"format": "pt"})
        follow_umask(tmp / "model.safetensors")  # save_file makes it 0600
        atomic_write_json(tmp / "config.json", asdict(cfg))
        if tok is not None:
            tok.save(tmp / "tokenizer.json")
        atomic_write_json(tmp / "source.json",
                          {"converted_from": str(Path(hf_dir).resolve()), "architecture": arch})
        if stop:
            atomic_write_json(tmp / "generation_config.json", {"eos_token_id": stop})
    if tok is None:  # weights-only is legitimate, but generate / fill-mask need a tokenizer.json
        print(f"warning: {hf_dir} has no tokenizer (tokenizer.json, vocab.txt or vocab.json + merges.txt), "
              f"so {out_dir} has no tokenizer.json; copy the model's tokenizer.json into {out_dir} before "
              "`lmforge generate` / `fill-mask`", file=sys.stderr)
    return cfg


def _read_run(run_dir: Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """A run dir's config and weights, checked against each other with errors naming our tensor."""
    from lmforge.models.store import WEIGHTS_FILE, load_config_json

    if is_hf_dir(run_dir):
        raise CheckpointError(f"{run_dir} is already a Hugging Face folder, so there is nothing to export; "
                              f"to import it into a run dir use `lmforge convert --from-hf {run_dir} OUT`")
    cfg = load_config_json(run_dir)
    if not (run_dir / WEIGHTS_FILE).is_file():
        raise CheckpointError(f"{run_dir / WEIGHTS_FILE} is missing; a run dir needs config.json + weights")
    sd = _load_safetensors(run_dir / WEIGHTS_FILE)
    expected = _our_shapes(cfg)
    for name, shape in expected.items():
        if name not in sd:
            raise CheckpointError(f"{run_dir / WEIGHTS_FILE} lacks tensor {name!r}; it does not match "
                                  "config.json")
        if tuple(sd[name].shape) != tuple(shape):
            raise CheckpointError(f"tensor {name!r} has shape {tuple(sd[name].shape)} but config.json "
                                  f"implies {tuple(shape)}; the weights do not match config.json")
    extra = sorted(set(sd) - set(expected))
    if extra:
        raise CheckpointError(f"{run_dir / WEIGHTS_FILE} has unexpected tensor {extra[0]!r}; "
                              "it does not match config.json")
    return cfg, sd


def export_hf(run_dir: str | Path, out_dir: str | Path, force: bool = False) -> str:
    """Our run dir -> a folder `transformers` loads with plain from_pretrained. Returns the HF class:
    GPT2LMHeadModel, LlamaForCausalLM, or for BERT the class matching model.heads (mlm,nsp ->
    BertForPreTraining, mlm -> BertForMaskedLM, none -> BertModel). A run dir without tokenizer.json
    exports the weights alone, with a warning on stderr."""
    from safetensors.torch import save_file

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_out(out_dir, force, run_dir)
    cfg, sd = _read_run(run_dir)
    arch = default_arch(cfg)
    hf_sd = to_hf_state_dict(sd, cfg, arch)
    dtype = next(iter(sd.values())).dtype
    hf_cfg = config_to_hf(cfg, arch, dtype)
    tok = convert_tokenizer.tokenizer_from_hf(run_dir) if (run_dir / "tokenizer.json").is_file() else None
    if tok is not None:
        check_tokenizer_fits(run_dir, tok.get_vocab_size(with_added_tokens=True), cfg.vocab_size)
    with atomic_dir(out_dir) as tmp:
        if tok is not None:
            causal = cfg.family == "gpt"  # a GPT's tokenizer(prompt) gives the ids lmforge generates from
            hf_cfg.update(convert_tokenizer.write_hf_tokenizer(tok, tmp, cfg.max_seq_len, causal))
        if ARCHITECTURES[arch] != "bert":
            gen = {k: hf_cfg[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in hf_cfg}
            stop = eos_ids(run_dir)  # an imported model's own list goes back out as it came in
            if not stop and tok is not None:  # where `lmforge generate` stops: eos, or a WordPiece [SEP]
                from lmforge.tokenizer import Tokenizer

                stop = Tokenizer(tok).stop_ids
            if stop:
                gen["eos_token_id"] = stop[0] if len(stop) == 1 else stop
            atomic_write_json(tmp / "generation_config.json", gen)
        save_file(hf_sd, tmp / "model.safetensors", metadata={"format": "pt"})
        follow_umask(tmp / "model.safetensors")  # save_file makes it 0600
        atomic_write_json(tmp / "config.json", hf_cfg)
    if tok is None:  # the weights are usable; AutoTokenizer fails (Llama) or has no vocabulary (GPT-2, BERT)
        print(f"warning: {run_dir} has no tokenizer.json, so {out_dir} has no tokenizer files and "
              "transformers' AutoTokenizer gets no vocabulary from it; copy the model's tokenizer.json "
              f"into {run_dir} and export again", file=sys.stderr)
    return arch


# ---------------------------------------------------------------------------------------------
# CLI


def register(parser: argparse.ArgumentParser) -> None:
    """`lmforge convert --from-hf HF_DIR OUT_RUN_DIR` | `lmforge convert --to-hf RUN_DIR OUT_HF_DIR`."""
    way = parser.add_mutually_exclusive_group(required=True)
    way.add_argument("--from-hf", metavar="HF_DIR", help="import a Hugging Face model folder into a run dir")
    way.add_argument("--to-hf", metavar="RUN_DIR", help="export a run dir to a Hugging Face model folder")
    parser.add_argument("out", metavar="OUT_DIR", help="folder to write (appears only when complete)")
    parser.add_argument("--force", action="store_true", help="replace OUT_DIR if it exists")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.from_hf:
        cfg = import_hf(args.from_hf, args.out, force=args.force)
        print(f"imported {args.from_hf} -> {args.out} (family {cfg.family}, {cfg.n_layer} layers, "
              f"d_model {cfg.d_model}, vocab {cfg.vocab_size})")
    else:
        arch = export_hf(args.to_hf, args.out, force=args.force)
        print(f"exported {args.to_hf} -> {args.out} ({arch}; load with transformers' from_pretrained)")
    return 0
