"""Checkpoints: atomic save, keep-last-K, and everything exact resume needs.

Layout (one folder per checkpoint, renamed into place only when complete, via `io.atomic_dir`):

    RUN/checkpoints/step-000500/           after 500 optimizer steps
        config.json  model.safetensors     the model (what `load()` reads), via models.store
        tokenizer.json                     the run's tokenizer
        trainer_state.pt                   optimizer, step, micro, RNG, data position, partial grads
    RUN/checkpoints/step-000500-micro-2/   stopped inside step 501 after 2 of its micro-batches

`trainer_state.pt` holds only tensors, numbers, strings, lists and dicts, so
`torch.load(path, weights_only=True)` reads it (no pickled classes). Its keys:

    step        optimizer steps completed           micro     micro-batches done in the current cycle
    optimizer   optimizer.state_dict()              stream    data position at the START of the cycle
    rng         torch / numpy / python / cuda RNG   grads     {param name: accumulated grad} if micro > 0
    loss_acc    summed loss of the micro-batches done so far in the cycle (for the logged step loss)
    grad_accum, batch_size   the cycle's shape (a mid-cycle resume must use the same)
No scheduler state: the LR is a pure function of the step (optim.lr_at).

Resuming mid-cycle restores the cycle's start position, re-reads the cycle's micro-batches (needed
anyway: the whole cycle's target count divides every micro-batch loss), puts the saved partial grads
back and continues at micro-batch `micro`, so the result is the same bits as never having stopped.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from lmforge.errors import CheckpointError, is_count
from lmforge.io import atomic_dir
from lmforge.models.convert_config import eos_ids
from lmforge.tokenizer import Tokenizer

STATE_FILE = "trainer_state.pt"
_NAME = re.compile(r"^step-(\d+)(?:-micro-(\d+))?$")
# model config keys that may change between a checkpoint and its resume (they do not shape weights)
RUNTIME_KEYS = {"dropout", "attn_impl"}


def checkpoint_name(step: int, micro: int = 0) -> str:
    """(500, 0) -> 'step-000500'; (500, 2) -> 'step-000500-micro-2'."""
    return f"step-{step:06d}" + (f"-micro-{micro}" if micro else "")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoint folders of a run, oldest first (temp folders start with '.' and are skipped)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(1)), int(m.group(2) or 0)), p))
    return [p for _, p in sorted(found)]


# ---------------------------------------------------------------------------------------------
# RNG state as plain tensors / lists (weights_only-safe)


def rng_state() -> dict[str, Any]:
    version, keys, gauss = random.getstate()
    kind, np_keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": {"version": version, "keys": list(keys), "gauss": gauss},
        "numpy": {"kind": kind, "keys": torch.from_numpy(np_keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py["version"], tuple(py["keys"]), py["gauss"]))
    n = state["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------
# save


def save_model_files(model: nn.Module, tokenizer, folder: Path) -> None:
    """config.json + model.safetensors (+ tokenizer.json, + generation_config.json when the tokenizer
    carries eos ids beyond its own eos, e.g. an imported instruct model's end-of-turn id) into `folder`."""
    from lmforge.io import atomic_write_json
    from lmforge.models.store import save_model

    save_model(model, folder)
    if tokenizer is not None:
        tokenizer.save(folder / "tokenizer.json")
        if tokenizer.eos_ids != ([tokenizer.eos_id] if tokenizer.eos_id is not None else []):
            atomic_write_json(folder / "generation_config.json", {"eos_token_id": tokenizer.eos_ids})


def save_checkpoint(run_dir: str | Path, model: nn.Module, tokenizer, state: dict[str, Any],
                    keep_last: int = 2) -> Path:
    """Write RUN/checkpoints/step-NNNNNN[-micro-J]/ atomically, then keep it and the `keep_last - 1`
    newest checkpoints older than it; older ones are deleted. Newer ones (left by an earlier, longer
    run in the same folder) are never deleted by a save: only what this run has passed."""
    final = Path(run_dir) / "checkpoints" / checkpoint_name(state["step"], state.get("micro", 0))
    with atomic_dir(final) as tmp:
        save_model_files(model, tokenizer, tmp)
        torch.save(state, tmp / STATE_FILE)
    if keep_last > 0:
        everything = list_checkpoints(run_dir)
        older = everything[:everything.index(final)]
        for old in older[:max(0, len(older) - (keep_last - 1))]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------------------------
# load


def load_state(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's trainer_state.pt; CheckpointError when it is missing, corrupt or malformed."""
    path = Path(ckpt) / STATE_FILE
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as e:  # truncated zip, bad pickle, ... : all mean "corrupt"
        raise CheckpointError(f"{path} is corrupt ({e.__class__.__name__}); {ckpt} cannot be used") from None
    wrong = _malformed(state)
    if wrong:  # it unpickles, but resuming from it would fail half-way: as unusable as a corrupt file
        raise CheckpointError(f"{path} is malformed ({wrong}); {ckpt} cannot be used")
    return state


def _malformed(state: Any) -> str | None:
    """What is wrong with a loaded trainer state's structure (the keys and types resume reads), or None."""
    if not isinstance(state, dict):
        return f"a {type(state).__name__}, not a dict"
    for key in ("step", "micro", "optimizer", "stream", "rng"):
        if key not in state:
            return f"no {key!r}"
    for key in ("step", "micro"):
        if not is_count(state[key]):
            return f"{key!r} is {state[key]!r}, not an int >= 0"
    opt = state["optimizer"]
    if not (isinstance(opt, dict) and isinstance(opt.get("state"), dict)
            and isinstance(opt.get("param_groups"), list)):
        return "'optimizer' is not an optimizer state_dict"
    if not isinstance(state["stream"], dict) or not state["stream"]:
        return "'stream' is not a data position"
    if not isinstance(state.get("loss_acc", 0.0), (int, float)):
        return "'loss_acc' is not a number"
    grads = state.get("grads")
    if state["micro"] and not (isinstance(grads, dict) and all(isinstance(g, torch.Tensor)
                                                               for g in grads.values())):
        return "a mid-cycle state without its partial 'grads'"
    before = rng_state()
    try:
        set_rng_state(state["rng"])
    except Exception as e:
        return f"'rng' does not load ({e.__class__.__name__})"
    finally:
        set_rng_state(before)  # it was a trial only
    return None


def load_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    path = Path(ckpt) / "model.safetensors"
    try:
        return load_file(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete") from None
    except Exception as e:
        raise CheckpointError(f"{path} is corrupt ({e.__class__.__name__}); {ckpt} cannot be used") from None


def load_model_config(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's config.json as a dict; CheckpointError when it is missing or not a JSON object."""
    path = Path(ckpt) / "config.json"
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        why = e.__class__.__name__
        raise CheckpointError(f"{path} is unreadable ({why}); {ckpt} cannot be used") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path} is not a model config (a JSON object); {ckpt} cannot be used")
    return saved


def check_model_config(ckpt: Path, model_cfg) -> None:
    """CheckpointError naming the first model key whose value differs from the checkpoint's config.json."""
    saved = load_model_config(ckpt)
    ours = dataclasses.asdict(model_cfg)
    for key, value in ours.items():
        if key in RUNTIME_KEYS or key not in saved:
            continue
        if saved[key] != value and key == "heads":  # the objective picks a BERT's heads
            raise CheckpointError(
                f"cannot resume: checkpoint {ckpt.name} was trained with heads {saved[key]!r} but this run's "
                f"objective builds {value!r}; pass the run's own --objective (mlm,nsp -> heads mlm,nsp, "
                "mlm -> heads mlm)"
            )
        if saved[key] != value:
            raise CheckpointError(
                f"cannot resume: checkpoint {ckpt.name} has model.{key}={saved[key]!r} but the config says "
                f"{value!r}; pass --model.{key}={saved[key]} or start a new run with another --out"
            )


def apply_weights(model: nn.Module, weights: dict[str, torch.Tensor], ckpt: Path,
                  fresh: tuple[str, ...] = ()) -> None:
    """Copy saved tensors into `model` in place (the optimizer keeps pointing at the same Parameters).

    Tied weights are stored once; a missing key is fine when it shares storage with a loaded one, or
    when it lies under one of the `fresh` submodules (e.g. "mlm."), which keep their initialisation.
    """
    own = model.state_dict(keep_vars=True)
    loaded_ptrs = set()
    with torch.no_grad():
        for name, tensor in weights.items():
            if name not in own:
                raise CheckpointError(f"{ckpt.name}/model.safetensors has unknown tensor {name!r}; "
                                      "it belongs to another model")
            if own[name].shape != tensor.shape:
                raise CheckpointError(
                    f"{ckpt.name}: tensor {name!r} is {tuple(tensor.shape)} but the model has "
                    f"{tuple(own[name].shape)}; the model config differs from the checkpoint's"
                )
            own[name].copy_(tensor)
            loaded_ptrs.add(own[name].data_ptr())
    missing = [n for n, t in own.items() if n not in weights and t.data_ptr() not in loaded_ptrs
               and not n.startswith(fresh)]
    if missing:
        raise CheckpointError(f"{ckpt.name}/model.safetensors lacks {missing[0]!r}; "
                              "the checkpoint is incomplete")


def latest_good(run_dir: str | Path, stream=None,
                model_cfg=None) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """Newest checkpoint whose config, state and weights all load; corrupt ones (or malformed: a state
    without the keys and types resume reads) are skipped with a warning. Given this run's `model_cfg`,
    a readable checkpoint of another model config is a CheckpointError (check_model_config); given its
    data `stream`, the state's data position is then loaded into it, and one that does not fit is malformed.

    Once a good one is found, the corrupt newer ones are renamed NAME.corrupt (kept for a look, but
    no longer resumed from, counted or pruned), so the run's newest checkpoint is a good one again.
    Raises CheckpointError when the run has no checkpoint or none is readable (nothing renamed then).
    """
    ckpts = list_checkpoints(run_dir)
    if not ckpts:
        raise CheckpointError(f"nothing to resume: {Path(run_dir) / 'checkpoints'} has no checkpoint; "
                              "drop --resume to start fresh")
    errors, bad = [], []

    def skip(ckpt: Path, why: str) -> None:
        errors.append(why)
        bad.append(ckpt)
        print(f"warning: {why}; trying the previous checkpoint", file=sys.stderr)

    for ckpt in reversed(ckpts):
        try:
            load_model_config(ckpt)
            eos_ids(ckpt)  # a corrupt generation_config.json makes the checkpoint unusable too
            if (ckpt / "tokenizer.json").is_file():  # and so does a tokenizer that api.load cannot read
                Tokenizer.load(ckpt)
            found = ckpt, load_state(ckpt), load_weights(ckpt)
        except CheckpointError as e:
            skip(ckpt, str(e))
            continue
        # outside the try: another model config, or a position saved with another data setup (the
        # stream's check_setup), is no corruption, and no older checkpoint of the run fixes it
        if model_cfg is not None:
            check_model_config(ckpt, model_cfg)
        if stream is not None and not _position_loads(stream, found[1]["stream"]):
            skip(ckpt, f"{ckpt / STATE_FILE} is malformed (its data position does not fit the data "
                       f"stream); {ckpt} cannot be used")
            continue
        for b in bad:
            aside = b.with_name(b.name + ".corrupt")
            shutil.rmtree(aside, ignore_errors=True)
            b.rename(aside)
            print(f"warning: moved the corrupt {b.name} aside to {aside.name}", file=sys.stderr)
        return found
    raise CheckpointError(f"no readable checkpoint in {Path(run_dir) / 'checkpoints'}: {errors[0]}")


def _position_loads(stream, position: dict[str, Any]) -> bool:
    """Load a saved data position into `stream`; False when it lacks keys or has values of wrong types."""
    try:
        stream.load_state_dict(position)
    except (KeyError, TypeError, ValueError, AttributeError):
        return False
    return True
