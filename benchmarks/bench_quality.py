"""Quality at equal compute: val loss of our gpt-small after the quickstart budget vs an equally sized
transformers.GPT2LMHeadModel trained on the same shards for the same wall time (issue #3: ours no worse).

Data: the token shards `lmforge quickstart` writes (runs/quickstart/shards: Shakespeare, byte-level
BPE with 8192 tokens, 5% val). If they are missing they are built into runs/bench_quality/ with the
quickstart's own calls (iter_documents, tokenizer.train, prepare).

Ours: `lmforge.train.pretrain.pretrain("gpt-small", ...)`, the call the quickstart makes, so the real
Trainer at the shipped defaults (bf16 autocast, attn math, fused AdamW, lr 1e-3 -> 1e-4, 50 warmup
steps, cosine) for the quickstart's budget of 600 steps x 16 x 256 tokens (--steps N to change).
Three overrides keep the clock on training alone: eval_every=0 (the quickstart evaluates every 100
steps), save_every past the end (no mid-run checkpoints) and log_every=1. W = the Trainer's own
`elapsed_s` at its last step: from the start of its loop to the end of the last optimizer step, so
data prep, model build, the final eval and the final save are out; its first (cold) step is in.

Peer: GPT2LMHeadModel with the preset's shape (layers, heads, d_model, vocab, n_positions = seq_len,
dropout = the preset's), the same init recipe (N(0, 0.02), residual projections / sqrt(2 n_layer),
its own random draw from the same seed), the same train windows in the same order (TokenWindows with
the run's seed, as CausalLM's stream), the same AdamW groups / betas / weight decay, grad clip and
warmup + cosine schedule (optim.build_optimizer, lr_at, set_lr), HF's own loss (fp32 mean
cross-entropy; targets passed pre-shifted as shift_labels, so all T targets of a window count, as in
ours). By default HF's fastest setting on this CPU: eager attention + bf16 autocast + torch.compile.
Compile time is not counted: HF first runs --hf-warmup steps (the first one compiles), its step time
is the median of the warm-up steps after the first; then the initial weights are restored and the
optimizer and data stream rebuilt, so the warm-up steps are thrown away and the timed run starts from
the same point as ours. Its schedule gets max_steps = floor(W / step time), so its cosine completes;
as lr_at does not look at max_steps during the lr warmup (50 steps), the estimate is refined after
each of those timed steps to floor(W / mean timed step time), then frozen. HF stops at W seconds or
at max_steps, whichever comes first.

Eval: both models, fp32, no autocast, on the same val windows (all of the val split, each window once,
or the first --eval-batches batches): mean token cross-entropy (sum of fp32 CE / targets) and its
exp, the perplexity. Each side trains and evaluates in its own process (spawn), one after the other,
so our process-wide allocator setting (train.keep_freed_memory) stays ours unless
--hf-keep-freed-memory gives it to HF too.

    python benchmarks/bench_quality.py                             # the issue's run (~15 min on 2 cores)
    python benchmarks/bench_quality.py --steps 10 --eval-batches 2 --no-hf-compile    # smoke test
    python benchmarks/bench_quality.py --seconds 120               # W = 120 s for both sides
    python benchmarks/bench_quality.py --shards DIR --tokenizer FILE --seed 1
    python benchmarks/bench_quality.py --hf-attn sdpa --hf-dtype fp32 --no-hf-compile

--seconds S gives each side S seconds: ours stops through train.max_time (the quickstart's --max-time)
and keeps the --steps schedule, so pick --steps near S / step time for its cosine to finish.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import multiprocessing as mp
import platform
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.config import ModelConfig, RunConfig, load_config  # noqa: E402
from lmforge.data.loader import TokenWindows  # noqa: E402

PRESET = "gpt-small"
QUICKSTART = Path("runs/quickstart")
OWN_DIR = Path("runs/bench_quality")  # shards built here when the quickstart's are missing; our run dir


# ---------------------------------------------------------------------------------------------
# data


def build_shards(root: Path) -> tuple[Path, Path]:
    """The quickstart's steps 1-3 (shakespeare, byte-level BPE 8192, prepare with 5% val) into root/."""
    from lmforge import tokenizer
    from lmforge.data.prepare import prepare
    from lmforge.data.readers import iter_documents

    shards, tok_path = root / "shards", root / "tokenizer" / "tokenizer.json"
    if (shards / "meta.json").is_file() and tok_path.is_file():
        return shards, tok_path
    print(f"building shards in {root} (the quickstart's calls: shakespeare, BPE 8192)", flush=True)
    tok = tokenizer.train("bpe", iter_documents("shakespeare"), vocab_size=8192)
    tok.save(tok_path)
    prepare(["shakespeare"], tok_path, shards, val_fraction=0.05, workers=2, progress=False)
    return shards, tok_path


@torch.no_grad()
def val_loss(logits_of, shards: str, seq_len: int, batch_size: int, seed: int,
             max_batches: int | None) -> tuple[float, int]:
    """(mean fp32 cross-entropy per target, targets) over the val windows, each once, in order.

    `logits_of(input_ids (B, T)) -> (B, T, V)`; the windows are the val stream's (shuffle off), so
    the first batches are the ones the Trainer's own eval reads.
    """
    windows = TokenWindows(shards, "val", seq_len, batch_size, seed, shuffle=False, epochs=1)
    loss_sum, n = 0.0, 0
    for i, w in enumerate(windows):  # one pass: the last batch may be short
        if max_batches and i == max_batches:
            break
        logits = logits_of(w[:, :-1])
        loss_sum += float(F.cross_entropy(logits.float().flatten(0, 1), w[:, 1:].flatten(), reduction="sum"))
        n += w[:, 1:].numel()
    return loss_sum / n, n


# ---------------------------------------------------------------------------------------------
# ours: pretrain(), as the quickstart calls it


def run_ours(shards: str, tokenizer: str | None, overrides: dict, out: str, eval_batches: int | None) -> dict:
    from lmforge.api import load
    from lmforge.train.pretrain import pretrain

    over = {**overrides, "data": {"tokenizer": tokenizer} if tokenizer else {}}
    metrics = pretrain(PRESET, shards=shards, out=out, overwrite=True, overrides=over, progress=False)
    cfg = load_config(PRESET, over)
    model, _ = load(out)  # the final weights, fp32, eval mode
    loss, n = val_loss(lambda x: model(x), shards, cfg.data.seq_len or cfg.model.max_seq_len,
                       cfg.train.batch_size, cfg.train.seed, eval_batches)
    m, t = cfg.model, cfg.train
    return {"name": f"ours {PRESET} (Trainer, attn {m.attn_impl}, {t.dtype}, compile={t.compile})",
            "steps": int(metrics["step"]), "max_steps": t.max_steps, "wall": metrics["elapsed_s"],
            "train_loss": metrics["loss"], "val_loss": loss, "val_targets": n,
            "params": sum(p.numel() for p in model.parameters()),
            "trainer_val_loss": metrics.get("val_loss")}


# ---------------------------------------------------------------------------------------------
# the peer: transformers.GPT2LMHeadModel, our optimizer and schedule, its own loss


def hf_config(m: ModelConfig, seq_len: int, attn: str):
    """GPT2Config of the same network as our ModelConfig `m` (refuses what GPT-2 cannot express)."""
    from transformers import GPT2Config

    gpt2 = dict(pos="learned", norm="layernorm", norm_position="pre", mlp="gelu_tanh", bias=True,
                tie_embeddings=True)
    odd = {k: getattr(m, k) for k, v in gpt2.items() if getattr(m, k) != v}
    if odd or m.kv_heads != m.n_head:
        raise SystemExit(f"{PRESET} is not a GPT-2 shape ({odd or 'grouped-query attention'}); no HF peer")
    hf = GPT2Config(vocab_size=m.vocab_size, n_positions=seq_len, n_embd=m.d_model, n_layer=m.n_layer,
                    n_head=m.n_head, n_inner=m.ff_dim, activation_function="gelu_new",
                    layer_norm_epsilon=m.norm_eps, initializer_range=m.init_std, resid_pdrop=m.dropout,
                    embd_pdrop=m.dropout, attn_pdrop=m.dropout, tie_word_embeddings=True, use_cache=False,
                    bos_token_id=0, eos_token_id=0)
    hf._attn_implementation = attn
    return hf


def run_hf(shards: str, cfg: RunConfig, seconds: float, attn: str, dtype: str, compile_: bool,
           warmup: int, eval_batches: int | None, keep_freed: bool) -> dict:
    from transformers import GPT2LMHeadModel

    from lmforge.train.optim import build_optimizer, lr_at, set_lr

    if keep_freed:
        from lmforge.runtime import keep_freed_memory

        keep_freed_memory()
    t, seq_len = cfg.train, cfg.data.seq_len or cfg.model.max_seq_len
    torch.manual_seed(t.seed)
    model = GPT2LMHeadModel(hf_config(cfg.model, seq_len, attn)).train()
    assert model.config._attn_implementation == attn
    model.loss_type = "ForCausalLM"  # what HF picks anyway, said explicitly (no "unrecognized" warning)
    init = {k: v.clone() for k, v in model.state_dict().items()}
    fwd = torch.compile(model) if compile_ else model
    bf16 = dtype == "bf16"
    autocast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    clip = t.grad_clip if t.grad_clip > 0 else float("inf")

    def fresh_start():
        """Initial weights, a new optimizer, the train stream from its first batch, the seeded RNG."""
        model.load_state_dict(init)  # in place: the compiled graph stays valid
        torch.manual_seed(t.seed)
        windows = TokenWindows(shards, "train", seq_len, t.batch_size, t.seed, shuffle=True)
        return windows, build_optimizer(model, t)  # same groups, same (fused) AdamW

    def step(i: int, windows, opt, sched) -> float:
        w = next(windows)  # (B, T+1); HF's own loss, targets pre-shifted: all T count
        with autocast():
            loss = fwd(input_ids=w[:, :-1], labels=w[:, :-1], shift_labels=w[:, 1:].contiguous()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        set_lr(opt, lr_at(i, sched))
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    windows, opt = fresh_start()
    times = []
    for i in range(warmup):  # compile + step-time estimate; thrown away below
        t0 = time.perf_counter()
        step(i, windows, opt, t)
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[1:])
    sched = replace(t, max_steps=max(1, int(seconds // step_s)))
    print(f"  HF warm-up: first step {times[0]:.1f} s (compile={compile_}), then {step_s:.3f} s/step "
          f"-> schedule max_steps {sched.max_steps} for {seconds:.1f} s", flush=True)

    windows, opt = fresh_start()
    done, loss = 0, float("nan")
    start = time.perf_counter()
    while done < sched.max_steps:
        loss = step(done, windows, opt, sched)
        done += 1
        elapsed = time.perf_counter() - start
        if done <= t.warmup_steps:  # lr_at ignores max_steps until warmup ends: refine it from real steps
            sched = replace(sched, max_steps=max(done + 1, int(seconds * done / elapsed)))
        if done % 100 == 0:
            print(f"  HF step {done}: loss {loss:.4f}, {elapsed:.0f} s", flush=True)
        if elapsed >= seconds:
            break
    wall = time.perf_counter() - start

    model.eval()
    vloss, n = val_loss(lambda x: model(input_ids=x).logits, shards, seq_len, t.batch_size, t.seed,
                        eval_batches)
    return {"name": f"HF GPT2LMHeadModel ({attn}, {dtype}, compile={compile_})", "steps": done,
            "max_steps": sched.max_steps, "wall": wall, "train_loss": loss, "val_loss": vloss,
            "val_targets": n, "params": sum(p.numel() for p in model.parameters())}


def in_own_process(fn, *args) -> dict:
    """fn(*args) in a fresh spawned process: process-wide state (allocator settings, heap) stays apart."""
    with ProcessPoolExecutor(max_workers=1, mp_context=mp.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", default=None,
                    help=f"token shards (default {QUICKSTART}/shards; built in {OWN_DIR}/ if missing)")
    ap.add_argument("--tokenizer", default=None,
                    help="tokenizer.json the shards were prepared with (default: the quickstart's, or "
                         "SHARDS/tokenizer.json with --shards)")
    ap.add_argument("--steps", type=int, default=None, help="our optimizer steps (default: the preset's 600)")
    ap.add_argument("--seconds", type=float, default=None,
                    help="wall time for both sides instead of our measured W")
    ap.add_argument("--seed", type=int, default=None, help="train.seed for both (default: the preset's)")
    ap.add_argument("--eval-batches", type=int, default=None, help="val batches (default: all of val)")
    ap.add_argument("--hf-attn", default="eager", choices=("eager", "sdpa"))
    ap.add_argument("--hf-dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--hf-compile", action=argparse.BooleanOptionalAction, default=True,
                    help="torch.compile the HF model (compile time not counted)")
    ap.add_argument("--hf-warmup", type=int, default=4, help="HF steps before the clock starts (>= 2)")
    ap.add_argument("--hf-keep-freed-memory", action="store_true",
                    help="give HF our allocator setting too (runtime.keep_freed_memory)")
    ap.add_argument("--out", default=str(OWN_DIR / "ours"), help="our run dir (replaced on each run)")
    args = ap.parse_args()
    if args.hf_warmup < 2:
        ap.error("--hf-warmup must be >= 2 (the first step compiles; the others give the step time)")

    if args.shards:
        shards = Path(args.shards)
        tok_path = Path(args.tokenizer) if args.tokenizer else shards / "tokenizer.json"
    elif (QUICKSTART / "shards" / "meta.json").is_file():
        shards = QUICKSTART / "shards"
        tok_path = Path(args.tokenizer) if args.tokenizer else QUICKSTART / "tokenizer" / "tokenizer.json"
    else:
        shards, tok_path = build_shards(OWN_DIR)
    from lmforge.data.prepare import load_meta
    from lmforge.tokenizer import Tokenizer

    meta, tok = load_meta(shards), Tokenizer.load(tok_path)
    train = {"eval_every": 0, "save_every": 10**9, "log_every": 1}  # the clock measures training only
    if args.steps:
        train["max_steps"] = args.steps
    if args.seconds:
        train["max_time"] = args.seconds
    if args.seed is not None:
        train["seed"] = args.seed
    overrides = {"model": {"vocab_size": tok.vocab_size}, "train": train}  # vocab as the quickstart sets it
    cfg = load_config(PRESET, overrides)
    m, t = cfg.model, cfg.train
    seq_len = cfg.data.seq_len or m.max_seq_len

    import transformers

    cpu = platform.processor() or platform.machine()
    splits = meta["splits"]
    print(f"bench_quality {datetime.date.today()} | {platform.platform()} ({cpu}), Python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"data {shards}: {splits['train']['tokens']:,} train / {splits['val']['tokens']:,} val tokens, "
          f"tokenizer {tok_path} ({tok.vocab_size} ids)")
    print(f"{PRESET}: {m.n_layer} layers, {m.n_head} heads, d_model {m.d_model}, vocab {m.vocab_size}, seq "
          f"{seq_len}, dropout {m.dropout}; batch {t.batch_size}, lr {t.lr} -> {t.min_lr}, warmup "
          f"{t.warmup_steps}, {t.schedule}, seed {t.seed}; ours {t.max_steps} steps"
          + (f", both {args.seconds:.0f} s" if args.seconds else "") + "\n", flush=True)

    print("ours: training ...", flush=True)
    ours = in_own_process(run_ours, str(shards), str(tok_path), overrides, args.out, args.eval_batches)
    seconds = args.seconds or ours["wall"]
    print(f"ours: {ours['steps']} steps in {ours['wall']:.1f} s\nHF: training for {seconds:.1f} s ...",
          flush=True)
    hf = in_own_process(run_hf, str(shards), cfg, seconds, args.hf_attn, args.hf_dtype, args.hf_compile,
                        args.hf_warmup, args.eval_batches, args.hf_keep_freed_memory)

    tokens = t.batch_size * seq_len
    which = f"first {args.eval_batches} batches" if args.eval_batches else "all"
    print(f"\nval: {ours['val_targets']:,} targets ({which} of val), fp32, no autocast, mean token CE")
    print(f"{'side':<56} {'steps':>11} {'train wall s':>12} {'tokens/s':>9} {'val loss':>9} {'val ppl':>9}")
    for s in (ours, hf):
        tps, loss = s["steps"] * tokens / s["wall"], s["val_loss"]
        print(f"{s['name']:<56} {s['steps']:>5}/{s['max_steps']:<5} {s['wall']:>12.1f} {tps:>9,.0f} "
              f"{loss:>9.4f} {math.exp(loss):>9.2f}")
    print(f"(steps = done/schedule's max_steps; params: ours {ours['params']:,}, HF {hf['params']:,}; "
          f"last train loss: ours {ours['train_loss']:.4f}, HF {hf['train_loss']:.4f}; our Trainer's "
          f"own final eval, {t.eval_steps} val batches in bf16: {ours['trainer_val_loss']:.4f})")
    if ours["steps"] < ours["max_steps"]:
        print(f"note: ours stopped at {seconds:.0f} s before its schedule's {ours['max_steps']} steps; "
              "its cosine did not finish")
    diff = ours["val_loss"] - hf["val_loss"]
    print(f"ours - HF val loss = {diff:+.4f} (ours no worse: {'yes' if diff <= 0 else 'no'})")


if __name__ == "__main__":
    main()
