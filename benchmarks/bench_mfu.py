"""Model FLOPs utilisation of training on one device: tokens/s x FLOPs/token / peak FLOP/s.

Runs the real Trainer step (accumulate + optimizer_step, as `lmforge pretrain` does) on random tokens
for a preset (default gpt2-124m, bf16 autocast, SDPA attention, torch.compile) and prints tokens/s
and MFU with the peak it used. FLOPs/token = 6N + 12 L T d (PaLM appendix B, N without position
tables), the same figure the Trainer logs. The peak comes from `runtime.peak_flops` (H100/H200 SXM
bf16 dense: 989 TFLOP/s) unless `--peak` gives one.

    python benchmarks/bench_mfu.py                                  # on a GPU: gpt2-124m, compile
    python benchmarks/bench_mfu.py --batch 16 --no-compile          # eager
    python benchmarks/bench_mfu.py --preset gpt-tiny --device cpu --steps 3 --warmup 1   # smoke test
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge import runtime  # noqa: E402
from lmforge.config import DataConfig, RunConfig, load_config  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="gpt2-124m")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (no accumulation)")
    ap.add_argument("--seq", type=int, default=None, help="default: the preset's max_seq_len")
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compile happens here)")
    ap.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"))
    ap.add_argument("--attn", default="sdpa", choices=("sdpa", "math"))
    ap.add_argument("--no-compile", dest="compile", action="store_false")
    ap.add_argument("--peak", type=float, default=None, help="peak FLOP/s of the device (default: detect)")
    args = ap.parse_args()

    import bench_train  # the Trainer step both benchmarks time (same folder)

    from lmforge.models.gpt import GPT
    from lmforge.objectives.clm import CausalLM
    from lmforge.train.trainer import Trainer

    base = load_config(args.preset)
    seq = args.seq or base.model.max_seq_len
    model_cfg = replace(base.model, attn_impl=args.attn, dropout=0.0)
    train = replace(base.train, batch_size=args.batch, grad_accum=1, device=args.device, dtype=args.dtype,
                    compile=args.compile, warmup_steps=10, max_steps=10_000, tensorboard=False)
    cfg = RunConfig(model=model_cfg, data=DataConfig(seq_len=seq), train=train)
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(model_cfg), CausalLM(cfg, None), out_dir="/nonexistent", progress=False)
    dev = trainer.device
    ids = torch.randint(0, model_cfg.vocab_size, (args.warmup + args.steps, args.batch, seq + 1))

    trainer_step = bench_train.trainer_step(trainer)  # returns a float: syncs the device

    def step(i: int) -> float:
        w = ids[i].to(dev)
        return trainer_step({"input_ids": w[:, :-1], "labels": w[:, 1:]})

    for i in range(args.warmup):
        step(i)
    t0 = time.perf_counter()
    for i in range(args.warmup, args.warmup + args.steps):
        loss = step(i)
    secs = time.perf_counter() - t0
    tps = args.steps * args.batch * seq / secs
    peak = args.peak or runtime.peak_flops(dev, args.dtype)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu"
    n_params = trainer.model.num_params() / 1e6
    print(f"{name}, torch {torch.__version__}; {args.preset} ({n_params:.1f}M params), "
          f"batch {args.batch} x seq {seq}, {args.dtype}, attn {args.attn}, compile={args.compile}")
    print(f"tokens/s: {tps:,.0f}   step: {secs / args.steps * 1000:.1f} ms   loss: {loss:.3f}")
    print(f"FLOPs/token: {trainer.flops_per_token / 1e9:.3f} GFLOP   peak: {peak / 1e12:.1f} TFLOP/s   "
          f"MFU: {tps * trainer.flops_per_token / peak:.1%}")


if __name__ == "__main__":
    main()
