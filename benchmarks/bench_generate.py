"""Greedy decoding speed, ours vs Hugging Face: new tokens/s at batch 1, KV cache on both sides.

Both models are built here with random weights from the same config (no download):
lmforge `GPT` + `lmforge.generate.generate(temperature=0)` against `transformers.GPT2LMHeadModel
.generate(do_sample=False, use_cache=True)`, a 16-token prompt, 256 new tokens, best of N runs
after a warm-up. Ours runs as `lmforge generate --dtype fp32|bf16|int8` does on a CPU: fp32 and bf16
with every Linear weight pre-packed for oneDNN (`layers.pack_linears_`), int8 = weight-only int8
Linear layers (per-channel scales) with bf16 activations (`layers.quantize_int8_`); and, for
reference, the fp32 model with plain nn.Linear layers as trained. The quality cost is reported as
top-1 agreement and max |logit diff| against that plain fp32 model on the same teacher-forced
sequence, and how many greedy tokens equal its tokens before the first difference.

    $ .venv/bin/python benchmarks/bench_generate.py                      # gpt-small and gpt2-124m
    $ .venv/bin/python benchmarks/bench_generate.py --configs gpt-small --repeats 5 --append
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time
from pathlib import Path

import torch

from lmforge.config import load_config
from lmforge.generate import generate
from lmforge.models.gpt import GPT
from lmforge.models.layers import pack_linears_, quantize_int8_

RESULTS = Path(__file__).resolve().parent / "RESULTS.md"
MACHINE = "2-core x86-64 CPU, AVX-512/AMX, no GPU"


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def hf_model(cfg):
    from transformers import GPT2Config, GPT2LMHeadModel

    hc = GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.max_seq_len, n_embd=cfg.d_model,
                    n_layer=cfg.n_layer, n_head=cfg.n_head, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    torch.manual_seed(0)
    return GPT2LMHeadModel(hc).eval()


def quality(fp32: GPT, low: GPT, seq: list[int]) -> tuple[float, float]:
    """(top-1 agreement, max |logit diff|) of `low` vs `fp32`, teacher-forced on `seq`."""
    x = torch.tensor([seq])
    with torch.inference_mode():
        a, b = fp32(x)[0].float(), low(x)[0].float()
    return (a.argmax(-1) == b.argmax(-1)).float().mean().item(), (a - b).abs().max().item()


def bench(preset: str, prompt_len: int, new: int, repeats: int) -> dict:
    cfg = load_config(preset).model
    cfg.max_seq_len = max(cfg.max_seq_len, 512 if prompt_len + new <= 512 else prompt_len + new)
    prompt = torch.randint(1, cfg.vocab_size, (1, prompt_len), generator=torch.Generator().manual_seed(0))
    row = {"preset": preset, "max_seq_len": cfg.max_seq_len}

    hf = hf_model(cfg)
    am = torch.ones_like(prompt)

    def run_hf():
        with torch.inference_mode():
            out = hf.generate(prompt, attention_mask=am, max_new_tokens=new, min_new_tokens=new,
                              do_sample=False, use_cache=True, pad_token_id=0)
        assert out.shape[1] == prompt_len + new

    row["hf_fp32"] = new / best_time(run_hf, repeats)
    hf = None  # free its memory before building ours

    torch.manual_seed(0)
    ours = GPT(cfg).eval()
    p = prompt[0].tolist()
    seqs = {}

    def run_ours(model, key):
        out = generate(model, [p], max_new_tokens=new, temperature=0)[0]
        assert len(out) == new
        seqs[key] = p + out

    row["ours_plain"] = new / best_time(lambda: run_ours(ours, "plain"), repeats)  # nn.Linear as trained
    for mode in ("fp32", "bf16", "int8"):  # as `lmforge generate --dtype MODE` runs on a CPU
        low = GPT(cfg).eval()
        low.load_state_dict(ours.state_dict())
        if mode == "int8":
            low = quantize_int8_(low)
        else:
            low = low.to(torch.bfloat16 if mode == "bf16" else torch.float32)
            assert pack_linears_(low)
        row[f"ours_{mode}"] = new / best_time(lambda m=low, k=mode: run_ours(m, k), repeats)
        row[f"{mode}_top1"], row[f"{mode}_maxdiff"] = quality(ours, low, seqs["plain"])
        row[f"{mode}_same"] = next((i for i, (a, b) in enumerate(zip(seqs["plain"], seqs[mode])) if a != b),
                                   len(seqs["plain"])) - prompt_len
        del low
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["gpt-small", "gpt2-124m"])
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch threads, both sides")
    ap.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [
        f"### {datetime.date.today()} - {MACHINE} ({platform.processor() or platform.machine()}), "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        f"batch 1, {args.prompt_len}-token prompt, {args.new} new tokens, greedy, KV cache, best of "
        f"{args.repeats} after a warm-up. New tokens/s (prefill included).",
        "",
        "| config | HF fp32 | ours fp32 nn.Linear | ours fp32 | ours bf16 | ours int8 | fp32/HF | bf16/HF "
        "| int8/HF | vs fp32 nn.Linear (top-1, max abs logit diff, greedy tokens equal before 1st diff):"
        " fp32 | bf16 | int8 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for preset in args.configs:
        r = bench(preset, args.prompt_len, args.new, args.repeats)
        hf = r["hf_fp32"]
        q = {m: f"{r[m + '_top1']:.3f}, {r[m + '_maxdiff']:.3f}, {r[m + '_same']}/{args.new}"
             for m in ("fp32", "bf16", "int8")}
        line = (f"| {preset} | {hf:.0f} | {r['ours_plain']:.0f} | {r['ours_fp32']:.0f} | "
                f"{r['ours_bf16']:.0f} | {r['ours_int8']:.0f} | "
                f"{r['ours_fp32'] / hf:.2f}x | {r['ours_bf16'] / hf:.2f}x | {r['ours_int8'] / hf:.2f}x | "
                f"{q['fp32']} | {q['bf16']} | {q['int8']} |")
        print(line, flush=True)
        lines.append(line)
    text = "\n".join(lines)
    print("\n" + text)
    if args.append:
        old = RESULTS.read_text() if RESULTS.exists() else "# Benchmark results\n"
        if "## generate" not in old:
            old = old.rstrip("\n") + "\n\n## generate\n"
        head, _, tail = old.partition("## generate\n")
        nxt = tail.find("\n## ")
        body, rest = (tail, "") if nxt < 0 else (tail[:nxt + 1], tail[nxt + 1:])
        RESULTS.write_text(head + "## generate\n" + body.rstrip("\n") + "\n\n" + text + "\n" + (
            "\n" + rest if rest else ""))


if __name__ == "__main__":
    main()
