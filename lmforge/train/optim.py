"""AdamW with decay / no-decay parameter groups, and learning-rate schedules as pure functions.

Weight decay goes on every parameter with 2 or more dimensions (linear weights and the token /
position embedding tables) and not on 1-D ones (biases, LayerNorm / RMSNorm gains). That is the
nanoGPT rule; it is simpler than Hugging Face's name list ("bias", "LayerNorm.weight") and agrees
with it except for embeddings, which nanoGPT (and GPT-2 / Llama recipes) do decay.

The optimizer is `torch.optim.AdamW(fused=True)` where the build supports it: on this 2-core
AVX-512 CPU the fused kernel measured fastest (see benchmarks/RESULTS.md, "train (GPT)").

Schedules map the 0-based optimizer step about to be taken to a learning rate:

    >>> from lmforge.config import TrainConfig
    >>> t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    >>> lr_at(0, t), lr_at(9, t), lr_at(60, t), lr_at(110, t)
    (0.1, 1.0, 0.55, 0.1)
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmforge.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """[{params: >=2-D tensors, weight_decay}, {params: 1-D tensors, weight_decay: 0}].

    Tied parameters appear once (`named_parameters` de-duplicates shared tensors).
    """
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def fused_available(device: torch.device) -> bool:
    """The fused AdamW kernel exists for CPU (torch >= 2.4) and CUDA; probe instead of guessing."""
    try:
        p = nn.Parameter(torch.zeros(2, device=device))
        p.grad = torch.zeros(2, device=device)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, TypeError, ValueError):
        return False


def build_optimizer(model: nn.Module, t: TrainConfig, impl: str = "auto") -> torch.optim.Optimizer:
    """AdamW over `param_groups`; impl: auto (fused when available, else foreach) | fused | foreach | loop.

    The lr set here is a placeholder: the Trainer writes `lr_at(step)` into every group before each step.
    """
    device = next(model.parameters()).device
    if impl == "auto":
        impl = "fused" if fused_available(device) else "foreach"
    kwargs = {"fused": True} if impl == "fused" else {"foreach": impl == "foreach"}
    return torch.optim.AdamW(
        param_groups(model, t.weight_decay), lr=t.lr, betas=(t.beta1, t.beta2), eps=t.eps, **kwargs
    )


def apply_hparams(optimizer: torch.optim.Optimizer, t: TrainConfig) -> None:
    """Write the config's betas, eps and weight decay into every group (decay only on >= 2-D tensors).

    After `load_state_dict` on resume the groups hold the checkpoint's values; a resumed run follows
    its own config, as run.yaml says. (lr needs nothing: the Trainer sets it before every step.)
    """
    for group in optimizer.param_groups:
        group["betas"], group["eps"] = (t.beta1, t.beta2), t.eps
        group["weight_decay"] = t.weight_decay if group["params"][0].dim() >= 2 else 0.0


def lr_at(step: int, t: TrainConfig) -> float:
    """Learning rate for the 0-based optimizer step `step`.

    Linear warmup from lr/warmup_steps up to lr over `warmup_steps` steps (step warmup-1 reaches lr),
    then cosine or linear decay from lr to min_lr at step max_steps, or constant lr. Past max_steps: min_lr
    (constant: lr).
    """
    if t.warmup_steps > 0 and step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    span = max(1, t.max_steps - t.warmup_steps)
    progress = min(1.0, (step - t.warmup_steps) / span)
    if t.schedule == "cosine":
        coeff = 0.5 * (1.0 + math.cos(math.pi * progress))  # 1 -> 0
    else:  # linear
        coeff = 1.0 - progress
    return t.min_lr + coeff * (t.lr - t.min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
