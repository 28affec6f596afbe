"""`lmforge pretrain`: config -> tokenizer + objective + model -> the one Trainer.

    lmforge pretrain gpt-small --data.shards data/shards --out runs/gpt-small
    lmforge pretrain gpt-small --data.shards data/shards --out runs/gpt-small --resume
    lmforge pretrain bert-small --objective mlm,nsp --data.shards data/wp-shards --train.lr=1e-4
    lmforge pretrain gpt-small --init-from runs/hf-gpt2 --data.shards data/gpt2-shards --out runs/more

CONFIG is a preset name (configs/*.yaml) or a YAML path; any `--section.key=value` overrides it.
The tokenizer is the one `lmforge prepare` copied next to the shards (shards/tokenizer.json), unless
--data.tokenizer names another with the same hash. The model's vocab_size must cover the tokenizer.
--init-from DIR (train.init_from) starts a new run from the weights of a run dir, a checkpoint or an
HF folder (converted in memory): DIR's config fixes the model (only model.dropout / attn_impl may be
overridden), CONFIG gives the rest, and the shards must use DIR's tokenizer. On --resume the weights
come from the run's own checkpoint, as always.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from lmforge.config import ModelConfig, load_config, merge, parse_overrides, read_run_train
from lmforge.errors import ConfigError, DataError

HEADS = ("pooler", "nsp", "mlm")  # task heads an objective may leave out of a model (bert.py)
RUN_MARKERS = ("run.yaml", "checkpoints", "metrics.jsonl", "model.safetensors")


def pretrain(config: str, shards: str | None = None, objective: str | None = None, out: str | None = None,
             resume: bool = False, overwrite: bool = False, overrides: list[str] | dict | None = None,
             progress: bool = True, init_from: str | None = None) -> dict[str, float]:
    """Train a model from CONFIG on token shards; returns the final metrics. See the module docstring."""
    from lmforge import runtime
    from lmforge.data.prepare import load_meta
    from lmforge.io import replacing
    from lmforge.objectives import make_objective
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import apply_weights, list_checkpoints
    from lmforge.train.trainer import Trainer, check_seq_len, check_vocab

    over = parse_overrides(overrides) if isinstance(overrides, list) else dict(overrides or {})
    cli = {"data": {"shards": shards},
           "train": {"objective": objective, "out_dir": out, "init_from": init_from}}
    cli = {s: {k: v for k, v in kv.items() if v is not None} for s, kv in cli.items()}
    for section, kv in cli.items():  # --out X --train.out_dir=Y: say so rather than pick one silently
        for key, value in kv.items():
            other = over.get(section, {}).get(key)
            if other is not None and other != value:
                raise ConfigError(f"--{section}.{key}={other} disagrees with {value!r} given by its own "
                                  "flag; give one of them")
    cfg = load_config(config, merge(over, {s: kv for s, kv in cli.items() if kv}))
    if not cfg.data.shards:
        raise ConfigError("no training data: pass --data.shards DIR (a folder written by `lmforge prepare`)")
    meta = load_meta(cfg.data.shards)
    tok_path = Path(cfg.data.tokenizer or Path(cfg.data.shards) / "tokenizer.json")
    tokenizer = Tokenizer.load(tok_path)
    if meta.get("tokenizer_hash") and tokenizer.hash != meta["tokenizer_hash"]:
        raise DataError(f"{tok_path} is not the tokenizer {cfg.data.shards} was prepared with; "
                        "drop --data.tokenizer or re-run `lmforge prepare` with it")
    init_weights = None
    if cfg.train.init_from:
        init_cfg, init_weights, init_tok = _read_init(Path(cfg.train.init_from))
        cfg.model = _init_model_config(Path(cfg.train.init_from), init_cfg, init_tok, over.get("model", {}),
                                       tokenizer)
    if cfg.model.family == "gpt" and cfg.train.init_from:  # its eos ids beyond the tokenizer's stay
        from lmforge.models.convert_config import eos_ids  # (a resumed checkpoint's: Trainer._restore)

        tokenizer.add_eos_ids(eos_ids(cfg.train.init_from))
    check_vocab(cfg.model.vocab_size, max(tokenizer.vocab_size, int(meta.get("vocab_size", 0))))
    seq_len = cfg.data.seq_len or cfg.model.max_seq_len
    check_seq_len(seq_len, cfg.model.max_seq_len)  # the Trainer checks it too; here before any model is built
    _check_out_dir(Path(cfg.train.out_dir), resume, overwrite)
    if resume:
        _check_run_tokenizer(Path(cfg.train.out_dir), tokenizer, tok_path)
        _note_changed_settings(cfg, Path(cfg.train.out_dir) / "run.yaml")

    runtime.seed_everything(cfg.train.seed)  # model init is part of the run's seed
    obj = make_objective(cfg, tokenizer)
    model = obj.build_model()
    if cfg.train.init_from and not resume:
        init, own, weights = Path(cfg.train.init_from), model.state_dict(), init_weights
        # heads differ between objectives; as transformers does (BertForMaskedLM from a BertForPreTraining
        # checkpoint, BertForPreTraining from a bare BertModel), extra heads are dropped, missing ones
        # start from their fresh initialisation
        unused = sorted({k.split(".")[0] for k in weights if k not in own and k.split(".")[0] in HEADS})
        fresh = sorted({k.split(".")[0] for k in own if k not in weights and k.split(".")[0] in HEADS})
        if unused:
            print(f"--init-from: leaving out {init}'s {', '.join(unused)} (not trained by "
                  f"{cfg.train.objective})", file=sys.stderr)
        if fresh:
            print(f"--init-from: {init} has no {', '.join(fresh)} head; it starts newly initialised",
                  file=sys.stderr)
        apply_weights(model, {k: v for k, v in weights.items() if k.split(".")[0] not in unused}, init,
                      fresh=tuple(f"{h}." for h in fresh))
    trainer = Trainer(cfg, model, obj, tokenizer, progress=progress)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"pretrain {cfg.train.objective}: {n_params / 1e6:.2f}M parameters, device {trainer.device}, "
          f"{cfg.train.dtype}, {cfg.train.max_steps} steps x {cfg.train.batch_size * cfg.train.grad_accum} "
          f"x {seq_len} tokens -> {cfg.train.out_dir}", file=sys.stderr)
    if resume:
        return trainer.fit(resume=True)
    # an old run (--overwrite) is moved aside, not deleted, until the new run writes a checkpoint: a run
    # that fails before that (bad data at the first step, Ctrl-C, a crash) leaves --out as it was, with
    # no half-made run dir; one that fails later (diverges) keeps its last good checkpoint to --resume
    out_dir = Path(cfg.train.out_dir)
    with replacing(out_dir, keep_failed=lambda: bool(list_checkpoints(out_dir))):
        return trainer.fit()


def _read_init(init: Path):
    """--init-from DIR -> (model config, weights, tokenizer or None) of a run dir, a checkpoint folder or
    a Hugging Face folder (converted in memory, as `lmforge.load` does; nothing is written)."""
    from lmforge.models import convert
    from lmforge.models.store import load_config_json
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import load_weights

    if convert.is_hf_dir(init):
        return convert.read_hf(init)
    cfg = load_config_json(init)
    tok = Tokenizer.load(init) if (init / "tokenizer.json").is_file() else None
    return cfg, load_weights(init), tok


def _init_model_config(init: Path, cfg: ModelConfig, init_tok, model_over: dict, tokenizer) -> ModelConfig:
    """DIR's model config, with only runtime keys overridable; DataError when DIR's tokenizer differs."""
    from lmforge.train.checkpoint import RUNTIME_KEYS

    for key, value in model_over.items():
        if key not in RUNTIME_KEYS and getattr(cfg, key, value) != value:
            raise ConfigError(f"--init-from {init} fixes model.{key}={getattr(cfg, key)!r}; drop "
                              f"--model.{key}={value} (only {', '.join(sorted(RUNTIME_KEYS))} can change)")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in model_over.items() if k in RUNTIME_KEYS})
    if init_tok is not None and init_tok.hash != tokenizer.hash:
        raise DataError(f"the shards were prepared with another tokenizer than {init}'s; re-run "
                        f"`lmforge prepare --tokenizer {init / 'tokenizer.json'}` so the ids mean what the "
                        "model learned")
    return cfg


def _check_run_tokenizer(out: Path, tokenizer, tok_path: Path) -> None:
    """--resume must go on with the ids the run learned: shards of another tokenizer would train on
    in silence. The run's tokenizer is its top-level tokenizer.json, else its newest readable checkpoint's."""
    from lmforge.errors import LmforgeError
    from lmforge.tokenizer import Tokenizer
    from lmforge.train.checkpoint import list_checkpoints

    for folder in [out, *reversed(list_checkpoints(out))]:
        path = folder / "tokenizer.json"
        if not path.is_file():
            continue
        try:
            theirs = Tokenizer.load(path)
        except LmforgeError:
            continue  # a corrupt checkpoint: the Trainer sets it aside; an older one decides
        if theirs.hash != tokenizer.hash:
            raise DataError(f"{tok_path} is not the tokenizer {out} was trained with; resume with shards "
                            f"prepared with {path}, or start a new run with another --out")
        return


def _note_changed_settings(cfg, run_yaml: Path) -> None:
    """On --resume, one stderr note naming the train.* settings that differ from the run's run.yaml
    (e.g. a larger max_steps stretches the LR schedule: legitimate, but not the run as it was)."""
    try:
        before = read_run_train(run_yaml)
    except ValueError:
        return  # no record to compare with: nothing to say
    now = dataclasses.asdict(cfg.train)
    changed = [f"train.{k}={now[k]!r} (was {before[k]!r})" for k in now if before.get(k, now[k]) != now[k]]
    if changed:
        print(f"note: resuming with changed settings: {', '.join(changed)}", file=sys.stderr)


def _check_out_dir(out: Path, resume: bool, overwrite: bool) -> None:
    """ConfigError unless --out can be used as asked."""
    if resume:
        if not (out / "checkpoints").is_dir():
            raise ConfigError(f"--resume: {out} has no checkpoints/; check --out or drop --resume")
        return
    if not out.exists() or (out.is_dir() and not any(out.iterdir())):
        return
    if not overwrite:
        raise ConfigError(f"output dir {out} exists and is not empty; pass --resume to continue it, "
                          "--overwrite to replace it, or another --out")
    if not out.is_dir() or not any((out / m).exists() for m in RUN_MARKERS):
        raise ConfigError(f"--overwrite: {out} does not look like a run dir (no run.yaml / checkpoints); "
                          "refusing to delete it, pick another --out")


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="preset name (configs/*.yaml, e.g. gpt-small) or a YAML path")
    parser.add_argument("--data.shards", dest="shards", metavar="DIR",
                        help="token shards folder from `lmforge prepare` (holds meta.json + tokenizer.json)")
    parser.add_argument("--objective", choices=("clm", "mlm", "mlm,nsp"), default=None,
                        metavar="clm|mlm|mlm,nsp",
                        help="what to optimize (default: the config's train.objective)")
    parser.add_argument("--out", default=None, help="run dir (default: the config's train.out_dir)")
    parser.add_argument("--init-from", dest="init_from", metavar="DIR", default=None,
                        help="start from the weights of a run dir, checkpoint or HF folder (its config "
                             "fixes the model)")
    again = parser.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue the run in --out exactly from its newest good checkpoint (repeat "
                            "the run's overrides, e.g. --train.max_steps, to continue it unchanged)")
    again.add_argument("--overwrite", action="store_true",
                       help="replace an existing run in --out (kept until the new run writes a checkpoint)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (logs still written)")
    parser.epilog = "Any config field can be overridden: --train.lr=3e-4 --model.n_layer=4"
    parser.set_defaults(func=_cmd, overrides=True)


def _cmd(args: argparse.Namespace) -> int:
    result = pretrain(args.config, shards=args.shards, objective=args.objective, out=args.out,
                      resume=args.resume, overwrite=args.overwrite, overrides=args.overrides,
                      progress=not args.no_progress, init_from=args.init_from)
    keys = ("step", "loss", "val_loss", "val_bpb")
    shown = ", ".join(f"{k}={v:.4g}" for k, v in result.items() if k in keys)
    print(f"done: {shown}")
    return 0
