"""`lmforge quickstart`: the whole pipeline in one go, on a real corpus, within minutes on a CPU.

    fetch (shakespeare by default) -> train a byte-level BPE tokenizer -> prepare token shards
    -> pretrain the `gpt-small` preset -> report val perplexity -> print samples -> next steps

Each step is the same plain Python call its CLI verb makes; nothing here is quickstart-only logic.
`--data` takes any named source or your own file / folder / glob. The training budget is a number
of optimizer steps (so the LR schedule completes), with `--max-time` as a safety net.

    lmforge quickstart                                  # what `make demo` runs
    lmforge quickstart --data austen --out runs/austen --steps 300
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

DEFAULT_PROMPTS = {
    "shakespeare": ["ROMEO.\n", "KING HENRY.\nWhat", "HAMLET.\nTo be, or not to be"],
}
FALLBACK_PROMPTS = ["The ", "It was ", "\n"]
FALLBACK_PROMPTS_ZH = ["今天", "我们", "\n"]  # Chinese data (language_of its first document)


def quickstart(data: str = "shakespeare", out: str = "runs/quickstart", preset: str = "gpt-small",
               vocab_size: int = 8192, steps: int | None = None, max_time: float = 480.0,
               prompts: list[str] | None = None, overrides: list[str] | None = None) -> dict:
    from lmforge import tokenizer
    from lmforge.config import load_config, merge, parse_overrides
    from lmforge.data.readers import resolve
    from lmforge.errors import ConfigError
    from lmforge.io import replacing
    from lmforge.train.checkpoint import list_checkpoints
    from lmforge.train.trainer import Diverged, TrainingError

    t0 = time.time()
    if steps is not None and steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {steps}")
    over = merge({"train": {"max_time": max_time, **({"max_steps": steps} if steps is not None else {})}},
                 parse_overrides(overrides or []))
    cfg = load_config(preset, over)  # a typo in the preset or an override fails now, before any deletion
    for section, key in (("train", "out_dir"), ("data", "shards"), ("data", "tokenizer")):
        if key in over.get(section, {}):  # pretrain would refuse it only after the tokenizer and shards
            raise ConfigError(f"quickstart makes its own {section}.{key} under --out (OUT/run, OUT/shards, "
                              f"OUT/tokenizer); drop --{section}.{key} and choose the folder with --out")
    if cfg.model.family != "gpt" or cfg.train.objective != "clm":
        raise ConfigError(f"quickstart trains a GPT (objective clm) but {preset} is a {cfg.model.family} "
                          f"preset for {cfg.train.objective}; use a gpt preset, or run the BERT steps of "
                          "docs/bert.md")
    tokenizer.check_vocab_size("bpe", vocab_size)
    root = Path(out)
    fresh = not root.exists()
    if not fresh and not (root / "quickstart.txt").exists():
        raise ConfigError(f"{root} exists and was not written by quickstart; pass another --out")
    resolve(data)  # a missing file fails, and a named source is fetched, before the old output is moved
    # a quickstart dir is always rebuilt from scratch, but the old one is only moved aside: any failure
    # (empty or corrupt data, a diverged run, Ctrl-C) puts it back as it was. A first run that fails
    # leaves nothing behind, unless its training wrote a checkpoint (then `--resume` can continue it)
    try:
        with replacing(root, keep_failed=lambda: fresh and bool(list_checkpoints(root / "run"))):
            return _pipeline(data, root, preset, vocab_size, over, overrides, prompts, t0)
    except Diverged as e:
        # its advice is pretrain's (--resume, --overwrite), and over an old output the checkpoint it names
        # went with the new run: say what quickstart's user can do instead
        where = "" if fresh else f"; {root} is back as it was before this run"
        raise TrainingError(f"{e.head}{where}; {e.fix} (quickstart takes --train.x=N overrides too) and run "
                            "quickstart again") from None


def _pipeline(data: str, root: Path, preset: str, vocab_size: int, over: dict, overrides: list[str] | None,
              prompts: list[str] | None, t0: float) -> dict:
    from lmforge import api, tokenizer
    from lmforge.config import merge
    from lmforge.data.prepare import prepare
    from lmforge.data.readers import ReadStats, iter_documents
    from lmforge.tokenizer_cli import language_of
    from lmforge.train.pretrain import pretrain

    root.mkdir(parents=True)
    (root / "quickstart.txt").write_text("written by `lmforge quickstart`; safe to delete\n")

    _step(1, f"data: {data}")
    stats = ReadStats()
    docs, first = 0, ""
    for doc in iter_documents(data, stats=stats):
        docs, first = docs + 1, first or doc
    print(f"  {docs} documents, {stats.bytes / 1e6:.1f} MB")

    _step(2, f"tokenizer: byte-level BPE, vocab {vocab_size}")
    tok = tokenizer.train("bpe", iter_documents(data), vocab_size=vocab_size)
    tok_path = root / "tokenizer" / "tokenizer.json"
    tok.save(tok_path)
    print(f"  {tok.vocab_size} tokens -> {tok_path}")

    _step(3, "prepare: token shards")
    shards = root / "shards"
    prepare([data], tok_path, shards, val_fraction=0.05, workers=2, progress=False)

    _step(4, f"pretrain: {preset} on the CPU (or GPU if present)")
    run = root / "run"
    over = merge({"model": {"vocab_size": tok.vocab_size}}, over)
    metrics = pretrain(preset, shards=str(shards), out=str(run), overrides=over)

    _step(5, "samples")
    model, tok = api.load(run, pack=True)  # inference only from here: oneDNN-packed weights on a CPU
    zh = language_of(first) == "zh"
    prompts = prompts or DEFAULT_PROMPTS.get(data) or (FALLBACK_PROMPTS_ZH if zh else FALLBACK_PROMPTS)
    next_prompt = prompts[0].strip() or "The"  # for the one-line command printed at the end
    for prompt in prompts:
        text = api.generate(model, tok, prompt, max_new_tokens=80, temperature=0.8, top_k=50, seed=0)
        print(f"--- {prompt!r}\n{prompt}{text}\n")

    val = {k: v for k, v in metrics.items() if k.startswith("val")}
    print(f"done in {time.time() - t0:.0f} s; " + ", ".join(f"{k} {v:.3f}" for k, v in val.items()))
    q = shlex.quote  # the commands below must work when pasted, whatever the paths hold
    more = max(2000, 2 * int(metrics.get("step", 0)))  # after the user's overrides, so that it wins
    print(f"""
run dir: {run}  (config.json, model.safetensors, tokenizer.json, run.yaml, metrics.jsonl, loss.png, tb/)
next:
  lmforge generate {q(str(run))} {q(next_prompt)} --temperature 0.8 --top-k 50
  lmforge eval {q(str(run))} --data {q(str(shards))}        # the whole val split, each window once
  tensorboard --logdir {q(str(run / "tb"))}
  lmforge pretrain {q(preset)} --data.shards {q(str(shards))} --train.out_dir {q(str(run))} --resume \\
    --model.vocab_size={tok.vocab_size}{"".join(" " + q(o) for o in overrides or [])} --train.max_steps={more}
  lmforge quickstart --data austen --out runs/austen     # or your own: --data 'my_texts/*.txt'
  lmforge convert --to-hf {q(str(run))} runs/hf-export           # load it with transformers
""")
    return metrics


def _step(i: int, what: str) -> None:
    print(f"\n[{i}/5] {what}", file=sys.stderr, flush=True)


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default="shakespeare", help="named source or your own file/folder/glob")
    parser.add_argument("--out", default="runs/quickstart", help="output folder (rebuilt on each run)")
    parser.add_argument("--preset", default="gpt-small", help="model/train preset (default gpt-small)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps (default: the preset's)")
    parser.add_argument("--max-time", type=float, default=480.0, help="training time cap in seconds")
    parser.add_argument("--prompt", action="append", dest="prompts", help="sample prompt (repeatable)")
    parser.set_defaults(func=_cmd, overrides=True)


def _cmd(args: argparse.Namespace) -> int:
    quickstart(args.data, args.out, args.preset, args.vocab_size, args.steps, args.max_time,
               args.prompts, args.overrides)
    return 0
