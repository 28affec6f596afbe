"""`lmforge model info CONFIG`: parameter count, training FLOPs per token, memory needed to train.

Counted from the config alone: models of 1 and 2 layers are built on the `meta` device (no memory,
no init time) and, every block having the same parameters, extrapolated to n_layer.

    FLOPs per token (training, forward + backward) = 6 N + 12 L T d     (Kaplan et al. 2020; PaLM App. B)
        N = the parameters that multiply every token: all but the embedding tables, plus the LM
        head's vocab_size x d_model when it is tied to the token embedding (its matmul is real even
        though its weights are the table's; nanoGPT counts it the same way). L = n_layer, T =
        sequence length, d = d_model; the second term is attention's QK^T and AV products. The
        Trainer's MFU uses this same number (`flops_per_token`).

    Training memory = weights + grads + AdamW (exp_avg, exp_avg_sq) + activations
        fp32: 4 + 4 + 8 bytes / param. bf16 autocast keeps fp32 master weights, grads and states,
        so only activations shrink (saved in bf16). Activations per layer per token, from
        Korthikanti et al. 2022 ("Reducing Activation Recomputation", eq. 1, no dropout masks):
        ~ 34 d + 5 h T bytes in 16-bit (x2 in fp32); plus the logits (B T V, fp32 for the loss).

    $ lmforge model info gpt2-124m --model.n_layer=24
"""

from __future__ import annotations

import argparse
from dataclasses import replace

import torch

from lmforge.config import ModelConfig, RunConfig, load_config


def param_counts(model: torch.nn.Module) -> tuple[int, int]:
    """(unique parameters: a tied head counts once, of which in embedding tables)."""
    params = sum(p.numel() for p in model.parameters())  # parameters() yields a shared tensor once
    emb = sum(mod.weight.numel() for mod in model.modules() if isinstance(mod, torch.nn.Embedding))
    return params, emb


def matmul_params(cfg: ModelConfig, non_embedding: int) -> int:
    """N of 6N: the non-embedding parameters, plus a tied LM head's matrix (module docstring)."""
    has_lm_head = cfg.family == "gpt" or "mlm" in cfg.heads.split(",")
    return non_embedding + (cfg.vocab_size * cfg.d_model if has_lm_head and cfg.tie_embeddings else 0)


def flops_per_token(cfg: ModelConfig, model: torch.nn.Module, seq_len: int) -> float:
    """Training FLOPs per token, 6 N + 12 L T d (module docstring); `model` built from `cfg`."""
    return _flops(cfg, *param_counts(model), seq_len)


def _flops(cfg: ModelConfig, params: int, emb: int, seq_len: int) -> float:
    return 6.0 * matmul_params(cfg, params - emb) + 12.0 * cfg.n_layer * seq_len * cfg.d_model


def _built_counts(cfg: RunConfig) -> tuple[ModelConfig, int, int]:
    """(the built model's config, params, embedding params) as the Trainer's objective builds it (an
    mlm-only BERT has no NSP head), from meta models of 1 and 2 layers: every block has the same
    parameters, so params(L) = params(1) + (L - 1) (params(2) - params(1)), at once for any L."""
    from lmforge.objectives import make_objective

    counts = []
    for n_layer in (1, 2):
        small = replace(cfg, model=replace(cfg.model, n_layer=n_layer))
        with torch.device("meta"):
            model = make_objective(small, None).build_model()
        counts.append(param_counts(model))
    (p1, e1), (p2, _) = counts
    L = cfg.model.n_layer
    return replace(model.cfg, n_layer=L), p1 + (L - 1) * (p2 - p1), e1


def model_info(cfg: RunConfig) -> dict:
    """Numbers for the model and the configured batch: params, FLOPs per token, memory (bytes)."""
    m, params, emb = _built_counts(cfg)
    non_emb = params - emb
    T = cfg.data.seq_len or m.max_seq_len
    B = cfg.train.batch_size
    flops = _flops(m, params, emb, T)
    act16 = m.n_layer * B * T * (34 * m.d_model + 5 * m.n_head * T)  # bytes in 16-bit
    logits = B * T * m.vocab_size * 4  # fp32 logits for the loss
    memory = {}
    for dtype, act in (("fp32", 2 * act16), ("bf16", act16)):
        w = params * 4
        memory[dtype] = {"weights": w, "grads": w, "adamw": 2 * w, "activations": act + logits}
        memory[dtype]["total"] = sum(memory[dtype].values())
    return {
        "params": params, "params_embedding": emb, "params_non_embedding": non_emb,
        "params_matmul": matmul_params(m, non_emb),
        "seq_len": T, "batch_size": B, "flops_per_token": flops,
        "flops_per_step": flops * B * T * cfg.train.grad_accum, "memory": memory,
    }


def _human(n: float, unit: str = "") -> str:
    for div, suf in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f} {suf}{unit}"
    return f"{n:.0f} {unit}".strip()


def _gib(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def format_info(cfg: RunConfig, info: dict) -> str:
    m = cfg.model
    lines = [
        f"model      family={m.family} n_layer={m.n_layer} n_head={m.n_head} n_kv_head={m.kv_heads} "
        f"d_model={m.d_model} d_ff={m.ff_dim} vocab_size={m.vocab_size} max_seq_len={m.max_seq_len}",
        f"params     {info['params']:,} total ({_human(info['params'])})",
        f"           {info['params_embedding']:,} embedding, {info['params_non_embedding']:,} non-embedding",
        f"FLOPs      {_human(info['flops_per_token'])} per token (training) = 6N + 12*L*T*d "
        f"= 6*{info['params_matmul']:,} + 12*{m.n_layer}*{info['seq_len']}*{m.d_model}",
        "           (N: non-embedding parameters + a tied LM head's matrix; the Trainer's MFU uses this)",
        f"           {_human(info['flops_per_step'])} per optimizer step "
        f"(batch {info['batch_size']} x seq {info['seq_len']} x accum {cfg.train.grad_accum})",
        f"memory     training with AdamW, micro-batch {info['batch_size']} x {info['seq_len']} tokens:",
    ]
    for dtype, label in (("fp32", "fp32"), ("bf16", "bf16 autocast")):
        mm = info["memory"][dtype]
        lines.append(
            f"  {label:<14} weights {_gib(mm['weights'])} + grads {_gib(mm['grads'])} + AdamW "
            f"{_gib(mm['adamw'])} + activations ~{_gib(mm['activations'])} = {_gib(mm['total'])}"
        )
    return "\n".join(lines)


def register(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="model_cmd", metavar="CMD", required=True)
    p = sub.add_parser("info", help="parameters, FLOPs per token and training memory of a config")
    p.add_argument("config", help="preset name or YAML path, then --model.x=N overrides")
    p.set_defaults(func=_cmd_info, overrides=True)


def _cmd_info(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.overrides)
    print(format_info(cfg, model_info(cfg)))
    return 0
