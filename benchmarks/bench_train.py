"""Training throughput: our GPT (through the real Trainer step) vs transformers.GPT2LMHeadModel, one run.

Same shape on both sides (6 layers, 6 heads, 384 dims, seq 256, batch 16, vocab 8192), dropout 0,
the same AdamW (decay on >= 2-D weights, betas (0.9, 0.95), wd 0.1, grad clip 1.0, warmup + cosine
lr), the same loss (summed fp32 cross-entropy / targets) and the same token batches: Zipf-distributed
random tokens, so the loss has somewhere to go (from ln V ~ 9.0 towards the unigram entropy) and
both curves can be compared.

Each side runs at its best setting: ours at the shipped defaults (the gpt-small preset's model, whose
attn_impl is math, and TrainConfig: bf16 autocast, fused AdamW, chunked CE, no torch.compile); HF
tries attn_implementation eager|sdpa x fp32|bf16 autocast (x torch.compile with --hf-compile) and
keeps its fastest, scoring with its own loss. The sides take turns for `--rounds` rounds and each
keeps its best round, so a noisy neighbour hurts both alike.

    python benchmarks/bench_train.py                      # everything (HF search without compile)
    python benchmarks/bench_train.py --hf-compile         # also HF + torch.compile (slow to compile)
    python benchmarks/bench_train.py --hf sdpa,bf16       # one HF variant only
    python benchmarks/bench_train.py --ours dtype=fp32    # override one of our TrainConfig knobs

`--model bert`: our BERT masked LM (objective mlm, MLM logits only at the ~15% masked positions)
vs transformers.BertForMaskedLM (logits everywhere), 6 layers, 384 dims, 6 heads, FFN 1536, seq 128,
batch 32, vocab 8192, dropout 0, the same masked batches and the same AdamW; HF scores with its own loss.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
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
    """One contestant: `step(window)` runs a full optimizer step on a (B, T+1) window and returns the loss."""

    name: str
    step: object
    losses: list = field(default_factory=list)
    best_tps: float = 0.0


# ---------------------------------------------------------------------------------------------
# our GPT: the Trainer's own accumulate + optimizer_step, at the shipped defaults


def gpt_model_config(**over) -> ModelConfig:
    """The shipped gpt-small preset (its attn_impl included), dropout 0; `over` for experiments."""
    from dataclasses import replace

    from lmforge.config import load_config

    cfg = replace(load_config("gpt-small").model, dropout=0.0, **over)
    assert (cfg.n_layer, cfg.n_head, cfg.d_model, cfg.max_seq_len, cfg.vocab_size) == tuple(
        SHAPE[k] for k in ("n_layer", "n_head", "d_model", "seq", "vocab")), "preset != SHAPE"
    return cfg


def ours_gpt(overrides: dict) -> Side:
    from lmforge.models.gpt import GPT
    from lmforge.objectives.clm import CausalLM
    from lmforge.train.trainer import Trainer

    model_cfg = gpt_model_config()
    cfg = RunConfig(model=model_cfg, data=DataConfig(seq_len=SHAPE["seq"]), train=train_config(**overrides))
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(model_cfg), CausalLM(cfg, None), out_dir="/nonexistent", progress=False)

    def step(w: torch.Tensor) -> float:
        acc, total, _ = trainer.accumulate([{"input_ids": w[:, :-1], "labels": w[:, 1:]}])
        loss, _, _ = trainer.optimizer_step(acc, total)
        trainer.step += 1
        return loss

    t = cfg.train
    return Side(f"ours GPT (attn {model_cfg.attn_impl}, dtype={t.dtype}, compile={t.compile})", step)


# ---------------------------------------------------------------------------------------------
# Hugging Face GPT-2, the same numbers


def hf_gpt2(attn: str, dtype: str, compile_: bool) -> Side:
    from transformers import GPT2Config, GPT2LMHeadModel

    hf_cfg = GPT2Config(vocab_size=SHAPE["vocab"], n_positions=SHAPE["seq"], n_embd=SHAPE["d_model"],
                        n_layer=SHAPE["n_layer"], n_head=SHAPE["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    hf_cfg._attn_implementation = attn
    torch.manual_seed(0)
    model = GPT2LMHeadModel(hf_cfg).train()
    assert model.config._attn_implementation == attn
    t = train_config()
    opt = build_optimizer(model, t)  # same groups, same fused AdamW
    fwd = torch.compile(model) if compile_ else model
    n_step = [0]

    def step(w: torch.Tensor) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with ctx:  # HF's own loss path (ForCausalLMLoss: fp32 logits, mean CE), targets pre-shifted
            loss = fwd(input_ids=w[:, :-1], labels=w[:, :-1], shift_labels=w[:, 1:].contiguous()).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        set_lr(opt, lr_at(n_step[0], t))
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_step[0] += 1
        return float(loss)

    return Side(f"HF GPT2LMHeadModel ({attn}, {dtype}, compile={compile_})", step)


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

    def step(batch: dict) -> float:
        acc, total, _ = trainer.accumulate([batch])
        loss, _, _ = trainer.optimizer_step(acc, total)
        trainer.step += 1
        return loss

    t = cfg.train
    return Side(f"ours BERT MLM (attn {model_cfg.attn_impl}, dtype={t.dtype}, compile={t.compile})", step)


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
    t = train_config()
    opt = build_optimizer(model, t)  # same groups, same fused AdamW
    fwd = torch.compile(model) if compile_ else model
    n_step = [0]

    def step(batch: dict) -> float:
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
        with ctx:
            # HF's own loss path: (B, T, V) logits at every position, fp32 mean CE over labels != -100
            loss = fwd(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        set_lr(opt, lr_at(n_step[0], t))
        opt.step()
        opt.zero_grad(set_to_none=True)
        n_step[0] += 1
        return float(loss)

    return Side(f"HF BertForMaskedLM ({attn}, {dtype}, compile={compile_})", step)


# ---------------------------------------------------------------------------------------------


def measure(side: Side, data: torch.Tensor, steps: int) -> float:
    """Run `steps` optimizer steps on the side's next windows; tokens/s of this round."""
    tokens = steps * SHAPE["batch"] * SHAPE["seq"]
    t0 = time.perf_counter()
    for _ in range(steps):
        side.losses.append(side.step(data[len(side.losses)]))
    tps = tokens / (time.perf_counter() - t0)
    side.best_tps = max(side.best_tps, tps)
    return tps


def parse_value(v: str):
    return {"true": True, "false": False}.get(v.lower(), int(v) if v.isdigit() else v)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="gpt", choices=("gpt", "bert"), help="which family to compare")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per round")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps first (compile happens here)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--hf", default="all", help="'all' or one variant as ATTN,DTYPE e.g. sdpa,bf16")
    ap.add_argument("--hf-compile", action="store_true", help="also try HF variants under torch.compile")
    ap.add_argument("--ours", action="append", default=[], help="TrainConfig override KEY=VALUE")
    args = ap.parse_args()

    ours_over = dict(kv.split("=", 1) for kv in args.ours)
    if args.model == "bert":
        SHAPE.update(BERT_SHAPE)
    ours_fn, hf_fn = (ours_bert, hf_bert) if args.model == "bert" else (ours_gpt, hf_gpt2)
    sides = [ours_fn({k: parse_value(v) for k, v in ours_over.items()})]
    variants = [tuple(args.hf.split(","))] if args.hf != "all" else [
        (a, d) for a in ("eager", "sdpa") for d in ("fp32", "bf16")]
    for attn, dtype in variants:
        for comp in (False, True) if args.hf_compile else (False,):
            sides.append(hf_fn(attn, dtype, comp))
    n_total = args.warmup + args.rounds * args.steps
    data = bert_batches(n_total) if args.model == "bert" else zipf_batches(n_total)
    print(f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
          f"{torch.__version__}; {SHAPE}; {args.warmup} warmup + {args.rounds} x {args.steps} steps")
    for side in sides:  # warmup (and compile) outside the timed rounds
        t0 = time.perf_counter()
        for _ in range(args.warmup):
            side.losses.append(side.step(data[len(side.losses)]))
        print(f"  warmup {side.name}: {time.perf_counter() - t0:.1f}s", flush=True)
    for r in range(args.rounds):
        for side in sides:
            print(f"  round {r + 1} {side.name}: {measure(side, data, args.steps):,.0f} tokens/s", flush=True)

    ours, hf = sides[0], max(sides[1:], key=lambda s: s.best_tps)
    print(f"\nHF best:  {hf.name}: {hf.best_tps:,.0f} tokens/s")
    print(f"ours:     {ours.name}: {ours.best_tps:,.0f} tokens/s")
    print(f"ratio ours / HF best: {ours.best_tps / hf.best_tps:.2f}x")
    print(f"loss after {n_total} steps on the same batches: ours {ours.losses[-1]:.4f}, "
          f"HF {hf.losses[-1]:.4f} (step 1: {ours.losses[0]:.4f} / {hf.losses[0]:.4f})")


if __name__ == "__main__":
    main()
