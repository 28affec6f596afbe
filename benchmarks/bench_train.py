"""Training throughput: our GPT (through the real Trainer step) vs transformers.GPT2LMHeadModel, one run.

Same shape on both sides (6 layers, 6 heads, 384 dims, seq 256, batch 16, vocab 8192), dropout 0,
the same AdamW (decay on >= 2-D weights, betas (0.9, 0.95), wd 0.1, grad clip 1.0, warmup + cosine
lr), the same loss (summed fp32 cross-entropy / targets) and the same token batches: Zipf-distributed
random tokens, so the loss has somewhere to go (from ln V ~ 9.0 towards the unigram entropy) and
both curves can be compared.

Each side runs at its best setting: ours at the shipped defaults (the gpt-small preset's model, whose
attn_impl is math, and TrainConfig: bf16 autocast, fused AdamW, keep_freed_memory, fused_kernels
(the compiled GELU and cross-entropy of lmforge/kernels.py), no whole-model torch.compile); HF tries
attn_implementation eager|sdpa x fp32|bf16 autocast (x torch.compile with --hf-compile) and keeps
its fastest, scoring with its own loss. Each side runs in its own process
(so our process-wide allocator setting stays ours unless --hf-keep-freed-memory gives it to HF too);
the sides take turns for `--rounds` rounds and each keeps its best round, so a noisy neighbour hurts
both alike. The median of the per-round ratios is printed too: the VM's own speed drifts 5-10% within
minutes, and a ratio of two rounds run back to back cancels most of that drift.

    python benchmarks/bench_train.py                      # everything (HF search without compile)
    python benchmarks/bench_train.py --hf-compile         # also HF + torch.compile (slow to compile)
    python benchmarks/bench_train.py --hf sdpa,bf16       # one HF variant only
    python benchmarks/bench_train.py --ours dtype=fp32    # override one of our TrainConfig knobs
    python benchmarks/bench_train.py --hf-keep-freed-memory   # HF with our allocator setting too
    python benchmarks/bench_train.py --model llama --hf-compile   # the Llama flavour vs LlamaForCausalLM

`--model llama`: the Llama flavour at the same size (configs/llama-small.yaml: RoPE, RMSNorm, SwiGLU
d_ff 1024, 2 kv heads, no biases, untied head) vs transformers.LlamaForCausalLM of the same config.

`--model bert`: our BERT masked LM (objective mlm, MLM logits only at the ~15% masked positions)
vs transformers.BertForMaskedLM (logits everywhere), 6 layers, 384 dims, 6 heads, FFN 1536, seq 128,
batch 32, vocab 8192, dropout 0, the same masked batches and the same AdamW; HF scores with its own loss.
"""

from __future__ import annotations

import argparse
import contextlib
import multiprocessing as mp
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lmforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig  # noqa: E402
from lmforge.train.optim import build_optimizer, lr_at, set_lr  # noqa: E402

SHAPE = dict(n_layer=6, n_head=6, d_model=384, seq=256, batch=16, vocab=8192)


def zipf_batches(n: int, seed: int = 0) -> torch.Tensor:
    """(n, B, T+1) token windows drawn i.i.d. from a Zipf(1.1) unigram over the vocabulary."""
    g = torch.Generator().manual_seed(seed)
    p = 1.0 / torch.arange(1, SHAPE["vocab"] + 1).double() ** 1.1
    ids = torch.multinomial(p, n * SHAPE["batch"] * (SHAPE["seq"] + 1), replacement=True, generator=g)
    return ids.view(n, SHAPE["batch"], SHAPE["seq"] + 1)


def train_config(**over) -> TrainConfig:
    return TrainConfig(batch_size=SHAPE["batch"], warmup_steps=5, max_steps=100, device="cpu", **over)


@dataclass
class Side:
    """One contestant: `step(window)` runs a full optimizer step on a (B, T+1) window and returns the loss
    (in the parent process `step` is the pipe to the contestant's worker process)."""

    name: str
    step: object
    losses: list = field(default_factory=list)
    best_tps: float = 0.0
    rounds: list = field(default_factory=list)  # tokens/s of each timed round


# ---------------------------------------------------------------------------------------------
# our GPT: the Trainer's own accumulate + optimizer_step, at the shipped defaults


def gpt_model_config(preset: str = "gpt-small", **over) -> ModelConfig:
    """A shipped preset of SHAPE's size (its attn_impl included), dropout 0; `over` for experiments."""
    from dataclasses import replace

    from lmforge.config import load_config

    cfg = replace(load_config(preset).model, dropout=0.0, **over)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.max_seq_len, cfg.vocab_size) == tuple(
        SHAPE[k] for k in ("n_layer", "n_head", "d_model", "seq", "vocab")), "preset != SHAPE"
    return cfg


def ours_gpt(overrides: dict, preset: str = "gpt-small") -> Side:
    from lmforge.models.gpt import GPT
    from lmforge.objectives.clm import CausalLM
    from lmforge.train.trainer import Trainer

    model_cfg = gpt_model_config(preset)
    cfg = RunConfig(model=model_cfg, data=DataConfig(seq_len=SHAPE["seq"]), train=train_config(**overrides))
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(model_cfg), CausalLM(cfg, None), out_dir="/nonexistent", progress=False)
    step = trainer_step(trainer)
    t = cfg.train
    return Side(f"ours {preset} (attn {model_cfg.attn_impl}, dtype={t.dtype}, "
                f"fused_kernels={t.fused_kernels}, compile={t.compile})",
                lambda w: step({"input_ids": w[:, :-1], "labels": w[:, 1:]}))


def trainer_step(trainer):
    """One optimizer step through the Trainer's own accumulate + optimizer_step, as fit() runs it."""

    def step(batch: dict) -> float:
        acc, total, _ = trainer.accumulate([batch])
        loss, _, _ = trainer.optimizer_step(acc, total)
        trainer.step += 1
        return loss

    return step


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2, the same numbers


def hf_step(model, dtype: str, compile_: bool, loss_of):
    """A full optimizer step for an HF model: `loss_of(fwd, batch)` -> HF's own loss, our AdamW."""
    t = train_config()
    opt = build_optimizer(model, t)  # same groups, same fused AdamW
    fwd = torch.compile(model) if compile_ else model
    n_step = [0]

    def step(batch) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with ctx:
            loss = loss_of(fwd, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        set_lr(opt, lr_at(n_step[0], t))
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_step[0] += 1
        return float(loss.detach())

    return step


def hf_clm_loss(fwd, w):
    """HF's own causal-LM loss path (ForCausalLMLoss: fp32 logits, mean CE) on a (B, T+1) window,
    targets pre-shifted."""
    return fwd(input_ids=w[:, :-1], labels=w[:, :-1], shift_labels=w[:, 1:].contiguous()).loss


def hf_gpt2(attn: str, dtype: str, compile_: bool) -> Side:
    from bench_quality import hf_config  # the one GPT2Config of our preset's network (same folder)
    from transformers import GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_config(gpt_model_config(), SHAPE["seq"], attn)).train()
    assert model.config._attn_implementation == attn
    model.loss_type = "ForCausalLM"  # what HF picks anyway, said explicitly (no "unrecognized" warning)

    step = hf_step(model, dtype, compile_, hf_clm_loss)
    return Side(f"HF GPT2LMHeadModel ({attn}, {dtype}, compile={compile_})", step)


def ours_llama(overrides: dict) -> Side:
    return ours_gpt(overrides, preset="llama-small")


def hf_llama(attn: str, dtype: str, compile_: bool) -> Side:
    """transformers.LlamaForCausalLM of the llama-small network (config through our HF exporter)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from lmforge.models.convert_config import config_to_hf

    hf_cfg = LlamaConfig.from_dict(config_to_hf(gpt_model_config("llama-small"), "LlamaForCausalLM"))
    hf_cfg.use_cache = False
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(hf_cfg, attn_implementation=attn).train()
    assert model.config._attn_implementation == attn
    model.loss_type = "ForCausalLM"

    step = hf_step(model, dtype, compile_, hf_clm_loss)
    return Side(f"HF LlamaForCausalLM ({attn}, {dtype}, compile={compile_})", step)


# ---------------------------------------------------------------------------------------------
# BERT masked LM (--model bert): ours through the Trainer vs transformers.BertForMaskedLM


BERT_SHAPE = dict(n_layer=6, n_head=6, d_model=384, seq=128, batch=32, vocab=8192, d_ff=1536)


def bert_batches(n: int, seed: int = 0) -> list[dict]:
    """n masked-LM batches: Zipf windows as [CLS] ... [SEP], BERT-masked (15%, 80/10/10) by our masker."""
    from lmforge.objectives.mlm import mask_tokens

    g = torch.Generator().manual_seed(seed)
    out = []
    for w in zipf_batches(n, seed):  # SHAPE was set to BERT_SHAPE; ids 0..4 act as the specials
        ids = w[:, : SHAPE["seq"]].clamp(min=5)
        ids[:, 0], ids[:, -1] = 2, 3  # [CLS], [SEP]
        x, y = mask_tokens(ids, mask_id=4, special_ids=torch.arange(5),
                           random_ids=torch.arange(5, SHAPE["vocab"]), mlm_prob=0.15, generator=g)
        out.append({"input_ids": x, "labels": y})
    return out


def bert_model_config() -> ModelConfig:
    """The shipped bert-small preset (its attn_impl included), MLM head only, dropout 0."""
    from dataclasses import replace

    from lmforge.config import load_config

    cfg = replace(load_config("bert-small").model, heads="mlm", dropout=0.0)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.ff_dim, cfg.max_seq_len, cfg.vocab_size) == tuple(
        SHAPE[k] for k in ("n_layer", "n_head", "d_model", "d_ff", "seq", "vocab")), "preset != BERT_SHAPE"
    return cfg


def ours_bert(overrides: dict) -> Side:
    from lmforge.models.bert import BertForPreTraining
    from lmforge.objectives.mlm import MaskedLM
    from lmforge.train.trainer import Trainer

    model_cfg = bert_model_config()
    cfg = RunConfig(model=model_cfg, data=DataConfig(seq_len=SHAPE["seq"]),
                    train=train_config(objective="mlm", **overrides))
    torch.manual_seed(0)
    trainer = Trainer(cfg, BertForPreTraining(model_cfg), MaskedLM(cfg, None), out_dir="/nonexistent",
                      progress=False)
    t = cfg.train
    return Side(f"ours BERT MLM (attn {model_cfg.attn_impl}, dtype={t.dtype}, compile={t.compile})",
                trainer_step(trainer))


def hf_bert(attn: str, dtype: str, compile_: bool) -> Side:
    from transformers import BertConfig, BertForMaskedLM

    hf_cfg = BertConfig(vocab_size=SHAPE["vocab"], hidden_size=SHAPE["d_model"],
                        num_hidden_layers=SHAPE["n_layer"], num_attention_heads=SHAPE["n_head"],
                        intermediate_size=SHAPE["d_ff"],
                        max_position_embeddings=SHAPE["seq"], hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12)
    torch.manual_seed(0)
    model = BertForMaskedLM._from_config(hf_cfg, attn_implementation=attn).train()
    assert model.config._attn_implementation == attn

    def loss_of(fwd, batch):  # HF's own loss: (B, T, V) logits everywhere, fp32 mean CE over labels != -100
        return fwd(input_ids=batch["input_ids"], labels=batch["labels"]).loss

    step = hf_step(model, dtype, compile_, loss_of)
    return Side(f"HF BertForMaskedLM ({attn}, {dtype}, compile={compile_})", step)


# ---------------------------------------------------------------------------------------------


def worker(conn, model: str, who: tuple, keep_freed: bool, n_batches: int) -> None:
    """One contestant in its own process: build it, then run the steps the parent asks for.

    Separate processes keep process-wide state apart: our Trainer's allocator setting
    (train.keep_freed_memory) and the heap each side leaves behind would otherwise leak into the
    other side's timings.
    """
    if model == "bert":
        SHAPE.update(BERT_SHAPE)
    if keep_freed:
        from lmforge.runtime import keep_freed_memory

        keep_freed_memory()
    sides = {"gpt": (ours_gpt, hf_gpt2), "llama": (ours_llama, hf_llama), "bert": (ours_bert, hf_bert)}
    ours_fn, hf_fn = sides[model]
    side = ours_fn(*who[1:]) if who[0] == "ours" else hf_fn(*who[1:])
    data = bert_batches(n_batches) if model == "bert" else zipf_batches(n_batches)
    conn.send(side.name)
    done = 0
    while (steps := conn.recv()) is not None:
        t0 = time.perf_counter()
        losses = [side.step(data[done + i]) for i in range(steps)]
        conn.send((time.perf_counter() - t0, losses))
        done += steps


def parse_value(v: str):
    return {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt", choices=("gpt", "llama", "bert"), help="which model to compare")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf", default="all", help="'all' or one variant as ATTN,DTYPE e.g. sdpa,bf16")
    ap.add_argument("--hf-compile", action="store_true", help="also try HF variants under torch.compile")
    ap.add_argument("--hf-keep-freed-memory", action="store_true",
                    help="give the HF sides our allocator setting too (runtime.keep_freed_memory)")
    ap.add_argument("--ours", action="append", default=[], help="TrainConfig override KEY=VALUE")
    args = ap.parse_args()

    ours_over = {k: parse_value(v) for k, v in (kv.split("=", 1) for kv in args.ours)}
    who = [("ours", ours_over)]
    variants = [tuple(args.hf.split(","))] if args.hf != "all" else [
        (a, d) for a in ("eager", "sdpa") for d in ("fp32", "bf16")]
    for attn, dtype in variants:
        for comp in (False, True) if args.hf_compile else (False,):
            who.append(("hf", attn, dtype, comp))
    n_total = args.warmup + args.rounds * args.steps
    shape = {**SHAPE, **BERT_SHAPE} if args.model == "bert" else SHAPE
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {shape}; {args.warmup} warmup + {args.rounds} x {args.steps} steps; "
          f"one process per side, HF keep_freed_memory={args.hf_keep_freed_memory}")
    ctx = mp.get_context("spawn")
    sides, conns, procs = [], [], []
    for w in who:
        parent, child = ctx.Pipe()
        keep = w[0] == "hf" and args.hf_keep_freed_memory  # ours: the Trainer decides, as in `pretrain`
        procs.append(ctx.Process(target=worker, args=(child, args.model, w, keep, n_total), daemon=True))
        procs[-1].start()
        conns.append(parent)
    for conn in conns:
        sides.append(Side(conn.recv(), conn))
    tokens = shape["batch"] * shape["seq"]
    for side in sides:  # warmup (and compile) outside the timed rounds, one side at a time
        side.step.send(args.warmup)
        secs, losses = side.step.recv()
        side.losses += losses
        print(f"  warmup {side.name}: {secs:.1f}s", flush=True)
    for r in range(args.rounds):
        for side in sides:  # one side runs while the others wait on their pipes
            side.step.send(args.steps)
            secs, losses = side.step.recv()
            side.losses += losses
            side.rounds.append(args.steps * tokens / secs)
            side.best_tps = max(side.rounds)
            print(f"  round {r + 1} {side.name}: {args.steps * tokens / secs:,.0f} tokens/s", flush=True)
    for side, p in zip(sides, procs):
        side.step.send(None)
        p.join()

    ours, hf = sides[0], max(sides[1:], key=lambda s: s.best_tps)
    print(f"\nHF best:  {hf.name}: {hf.best_tps:,.0f} tokens/s")
    print(f"ours:     {ours.name}: {ours.best_tps:,.0f} tokens/s")
    print(f"ratio ours / HF best: {ours.best_tps / hf.best_tps:.2f}x")
    # the VM's speed drifts within a run; rounds run back to back, so a round's own ratio cancels most of it
    paired = sorted(o / h for o, h in zip(ours.rounds, hf.rounds))
    print(f"per-round ratio (ours / that HF side, same round): median {statistics.median(paired):.2f}x, "
          f"range {paired[0]:.2f}-{paired[-1]:.2f}x over {len(paired)} rounds")
    print(f"loss after {n_total} steps on the same batches: ours {ours.losses[-1]:.4f}, "
          f"HF {hf.losses[-1]:.4f} (step 1: {ours.losses[0]:.4f} / {hf.losses[0]:.4f})")


if __name__ == "__main__":
    main()
