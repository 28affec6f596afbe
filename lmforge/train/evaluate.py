"""`lmforge eval`: score a run dir (or an HF folder) on a split of token shards: loss, perplexity, bpb.

    lmforge eval runs/quickstart/run --data runs/quickstart/shards      # the whole val split, once
    lmforge eval runs/hf-gpt2 --data data/gpt2-shards --split train --max-batches 50 --json

The score is the model family's pretraining objective (clm for a gpt, a bert's own heads: mlm,nsp
with an NSP head, else mlm; --objective picks another) computed by `evaluate` below, the same
function the Trainer calls every `train.eval_every` steps, so a run's logged val_loss and `lmforge eval`
agree given the same batches (`--batch-size` and `--max-batches` = the run's batch_size and eval_steps,
`--dtype` its dtype; the MLM settings, train.mlm_prob and co., come from the run dir's run.yaml).
The shards must have been prepared with the model's own tokenizer; meta.json's hash says so.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import sys
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from lmforge import runtime
from lmforge.config import read_run_train
from lmforge.objectives.base import Objective, to_device


@torch.no_grad()
def evaluate(model: nn.Module, objective: Objective, batches: Iterable[dict[str, torch.Tensor]],
             device: torch.device, dtype: str, max_batches: int | None = None) -> dict[str, float]:
    """{"loss": mean per target, "ppl", "targets", + objective.metrics extras (clm: "bpb",
    "bytes_per_token")} over `batches` (at most `max_batches`); {} when they hold no target.

    The model runs in eval mode (dropout off) under `runtime.autocast(device, dtype)` and is put back
    in the mode it was in. A finite val stream (val splits end after one pass) is read to its end."""
    was_training = model.training
    model.eval()
    stats: dict[str, float] = {}
    loss_sum, n = 0.0, 0
    try:
        for batch in itertools.islice(batches, max_batches):
            with runtime.autocast(device, dtype):
                ls, nb = objective.loss(model, to_device(batch, device))
            loss_sum += float(ls)
            n += int(nb)
            for key, value in objective.eval_stats(batch).items():  # sums only: memory stays flat
                stats[key] = stats.get(key, 0) + value
    finally:
        model.train(was_training)
    if n == 0:
        return {}
    mean = loss_sum / n
    out = {"loss": mean, "ppl": math.exp(min(mean, 80.0)), "targets": n}
    out.update(objective.metrics(stats, loss_sum, n))
    return out


# ---------------------------------------------------------------------------------------------
# CLI


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", help="a run dir (config.json, model.safetensors, tokenizer.json) or an "
                        "HF model folder")
    parser.add_argument("--data", required=True, metavar="SHARDS",
                        help="a folder written by `lmforge prepare` with the model's tokenizer")
    parser.add_argument("--split", default="val", help="which split to score (default val)")
    parser.add_argument("--objective", default=None,
                        help="clm | mlm | mlm,nsp (default: clm for a gpt, a bert's own heads: mlm[,nsp])")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per batch (default 16)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="window length (default: the model's max_seq_len)")
    parser.add_argument("--max-batches", type=int, default=None,
                        help="score only the first N batches (default: the whole split, each window once)")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"],
                        help="autocast dtype, as train.dtype (default bf16; fp32 for the exact value)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default auto)")
    parser.add_argument("--seed", type=int, default=0,
                        help="the stream's seed: mlm masks and NSP pairs, and the window order of the train "
                        "split (default 0; the Trainer's eval uses train.seed)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of a line")
    parser.set_defaults(func=run)


OBJECTIVE_SETTINGS = ("mlm_prob", "whole_word_mask", "nsp_weight", "short_seq_prob")  # train.* keys


def objective_settings(folder: Path) -> dict:
    """The train.* settings that change what an objective scores (the MLM mask rate, ...) as the run
    dir's run.yaml recorded them (a checkpoint folder: its run's); {} for an HF folder."""
    path = folder / "run.yaml"
    if not path.is_file() and folder.parent.name == "checkpoints":
        path = folder.parent.parent / "run.yaml"
    if not path.is_file():
        return {}
    try:
        train = read_run_train(path)
    except ValueError as e:
        print(f"warning: {path} is unreadable ({e}); scoring with the default "
              f"{', '.join('train.' + k for k in OBJECTIVE_SETTINGS)}", file=sys.stderr)
        return {}
    return {k: train[k] for k in OBJECTIVE_SETTINGS if k in train}


def run(args: argparse.Namespace) -> int:
    from lmforge.api import load
    from lmforge.config import DataConfig, RunConfig, TrainConfig, from_dict
    from lmforge.data.prepare import load_meta
    from lmforge.errors import ConfigError, DataError
    from lmforge.objectives import OBJECTIVES, make_objective, objective_class

    for flag, value, low in (("--batch-size", args.batch_size, 1), ("--seq-len", args.seq_len, 1),
                             ("--max-batches", args.max_batches, 1), ("--seed", args.seed, 0)):
        if value is not None and value < low:
            raise ConfigError(f"{flag} must be >= {low}, got {value}")
    if args.objective is not None and args.objective not in OBJECTIVES:
        raise ConfigError(f"--objective {args.objective!r} is not one of: {', '.join(OBJECTIVES)}")
    meta = load_meta(args.data)  # before the model: a wrong folder costs nothing
    device = runtime.pick_device(args.device, flag="--device")
    model, tok = load(args.run_dir, device=device, need_tokenizer=True)
    if meta.get("tokenizer_hash") and tok.hash != meta["tokenizer_hash"]:
        raise DataError(f"{args.data} was prepared with another tokenizer than {args.run_dir}'s; re-run "
                        f"`lmforge prepare` with {Path(args.run_dir) / 'tokenizer.json'}")
    mcfg = model.cfg
    if int(meta.get("vocab_size", 0)) > mcfg.vocab_size:
        raise DataError(f"{args.data} holds ids up to {meta['vocab_size'] - 1} but the model's vocab_size "
                        f"is {mcfg.vocab_size}; the shards belong to another model")
    seq_len = args.seq_len or mcfg.max_seq_len
    if seq_len > mcfg.max_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is longer than the model's context ({mcfg.max_seq_len}); "
                          "lower --seq-len")
    if mcfg.family == "bert" and "mlm" not in mcfg.heads.split(","):
        raise ConfigError(f"{args.run_dir} is an encoder without an MLM head (heads={mcfg.heads or 'none'}): "
                          "there is no language-modelling loss to score")
    name = args.objective or ("clm" if mcfg.family == "gpt" else "mlm,nsp" if "nsp" in mcfg.heads else "mlm")
    if (name == "clm") != (mcfg.family == "gpt"):
        fix = "mlm" if name == "clm" else "clm"
        raise ConfigError(f"objective {name} cannot score {args.run_dir}, a {mcfg.family} model; "
                          f"use --objective {fix}")
    if mcfg.family == "bert" and not set(name.split(",")) <= set(mcfg.heads.split(",")):
        raise ConfigError(f"objective {name} needs the heads {name} but {args.run_dir} has "
                          f"heads={mcfg.heads}; use --objective mlm")
    if seq_len < objective_class(name).min_seq_len:
        raise ConfigError(f"--seq-len {seq_len} is too short for objective {name}; "
                          f"use >= {objective_class(name).min_seq_len}")
    train = {"objective": name, "batch_size": args.batch_size, "dtype": args.dtype,
             **objective_settings(Path(args.run_dir))}
    cfg = RunConfig(model=mcfg, data=DataConfig(shards=str(args.data), seq_len=seq_len),
                    train=from_dict(TrainConfig, train, prefix="train."))
    objective = make_objective(cfg, tok)
    stream = objective.stream(args.split, args.batch_size, args.seed, one_pass=True)  # train too
    out = evaluate(model, objective, stream, device, args.dtype, args.max_batches)
    if not out:
        raise DataError(f"the {args.split} split of {args.data} gave no targets to score")
    if args.json:
        print(json.dumps({"split": args.split, **out}))
        return 0
    extra = f", bpb {out['bpb']:.4f}" if "bpb" in out else ""
    print(f"{args.run_dir} on {args.data} {args.split}: loss {out['loss']:.4f}, ppl {out['ppl']:.2f}{extra} "
          f"({out['targets']:,} targets)")
    return 0
