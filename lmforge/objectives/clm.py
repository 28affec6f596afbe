"""Causal language modelling: predict token t+1 from tokens <= t (GPT pretraining).

Batches come from `TokenWindows` (packed windows of seq_len + 1 tokens from the shards):

    w = [[5, 9, 2, 7]]                       # (B, T+1)
    input_ids = w[:, :-1] = [[5, 9, 2]]      # (B, T)
    labels    = w[:, 1:]  = [[9, 2, 7]]      # (B, T); -100 marks an unscored position

Loss = cross-entropy summed over scored targets, computed in fp32 from the model's logits;
the Trainer divides by the target count of the whole accumulation cycle.

Eval extras: perplexity comes from the Trainer (exp of mean loss); this objective adds bits per
byte, `bpb = sum_nats / ln(2) / n_bytes`, where n_bytes is measured, not assumed: each target
counts the bytes it stands for (byte-level BPE: `Tokenizer.byte_lengths`, exact even for a
character cut between two windows; other tokenizers: each row of targets is decoded and its UTF-8
length summed). Special tokens count 0 bytes. That makes bpb comparable across tokenizers.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge import kernels
from lmforge.errors import ConfigError
from lmforge.objectives.base import IGNORE_INDEX, Objective, ends_after_one_pass


class WindowStream:
    """TokenWindows (B, T+1) -> {"input_ids": (B, T), "labels": (B, T)}; position = the loader's."""

    def __init__(self, windows):
        self.windows = windows

    def __iter__(self) -> WindowStream:
        return self

    def __next__(self) -> dict[str, Tensor]:
        w = next(self.windows)  # (B, T+1)
        return {"input_ids": w[:, :-1], "labels": w[:, 1:]}

    def state_dict(self) -> dict[str, Any]:
        return self.windows.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.windows.load_state_dict(state)


class ChunkedCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy whose gradient is computed in the forward pass.

    d(sum CE)/d logits = softmax(logits) - onehot(label) (0 for ignored rows), so the forward pass can
    write it straight into one buffer in the logits' dtype while each row is in cache, and backward
    only scales it. On a CPU or CUDA that is one fused compiled kernel (`kernels.ce_and_grad`, ~11 ms
    for 4096 x 8192 bf16 logits on 2 CPU cores); elsewhere, or without a compiler, the eager loop
    below does it a chunk of rows at a time (~40 ms there in 32-row chunks;
    `F.cross_entropy(logits.float(), ...)` forward + backward takes ~270 ms, for its fp32 copy of the
    logits, saved log-softmax and zero-filled NLL gradient). The math is fp32 either way.
    """

    CHUNK = 32  # rows on a CPU; 32 x 8192 fp32 = 1 MiB, cache-resident
    GPU_CHUNK = 1 << 26  # elements per chunk elsewhere (256 MiB fp32): few, large kernel launches

    @staticmethod
    def forward(ctx, logits: Tensor, labels: Tensor) -> Tensor:  # logits (N, V), labels (N,)
        fused = kernels.ce_and_grad(logits, labels, IGNORE_INDEX)
        if fused is not None:
            total, grad = fused
        else:
            total, grad = ChunkedCrossEntropy.eager(logits, labels)
        ctx.save_for_backward(grad)
        ctx.used = False
        return total

    @staticmethod
    def eager(logits: Tensor, labels: Tensor, rows: int | None = None) -> tuple[Tensor, Tensor]:
        """(summed loss, gradient), `rows` rows at a time (default: CHUNK on a CPU, else GPU_CHUNK / V)."""
        if rows is None:
            big = max(1, ChunkedCrossEntropy.GPU_CHUNK // logits.shape[1])
            rows = ChunkedCrossEntropy.CHUNK if logits.device.type == "cpu" else big
        grad = torch.empty_like(logits)  # (N, V), the logits' dtype
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        for s in range(0, logits.shape[0], rows):
            x = logits[s:s + rows].to(torch.float32, copy=True)  # (c, V)
            y = labels[s:s + rows]
            valid = y != IGNORE_INDEX  # (c,)
            idx = torch.where(valid, y, 0)[:, None]  # (c, 1)
            lse = torch.logsumexp(x, dim=-1, keepdim=True)  # (c, 1)
            total += ((lse - x.gather(1, idx)).squeeze(1) * valid).sum()
            x.sub_(lse).exp_()  # softmax
            x.scatter_add_(1, idx, torch.full_like(x[:, :1], -1.0))  # - onehot(label)
            torch.mul(x, valid[:, None], out=grad[s:s + rows])  # cast on write
        return total, grad

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        # scaled in place: a fresh (N, V) tensor would cost a page-faulting allocation every step
        assert not ctx.used, "ChunkedCrossEntropy's graph can be backpropagated once (no retain_graph)"
        ctx.used = True
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_out.to(grad.dtype)), None


def cross_entropy_sum(logits: Tensor, labels: Tensor) -> Tensor:
    """Sum of fp32 cross-entropies over labels != -100. logits (N, V), labels (N,).

    Equal to F.cross_entropy(logits.float(), labels, ignore_index=-100, reduction="sum") (tested);
    computed by ChunkedCrossEntropy when gradients are needed. Any objective scoring a vocabulary
    uses it (clm here, mlm on the masked positions).
    """
    if torch.is_grad_enabled() and logits.requires_grad:
        return ChunkedCrossEntropy.apply(logits, labels)
    return F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def lm_loss(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """(sum of fp32 cross-entropies over labels != -100, their count). logits (B, T, V), labels (B, T)."""
    return cross_entropy_sum(logits.flatten(0, 1), labels.flatten()), (labels != IGNORE_INDEX).sum()


class CausalLM(Objective):
    name = "clm"

    def stream(self, split: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
               one_pass: bool | None = None):
        from lmforge.data.loader import TokenWindows

        windows = TokenWindows(
            self.cfg.data.shards, split, self.seq_len, batch_size, seed,
            rank=rank, world_size=world_size, shuffle=split == "train",
            epochs=1 if ends_after_one_pass(split, one_pass) else None,
        )
        return WindowStream(windows)

    def build_model(self) -> nn.Module:
        if self.cfg.model.family != "gpt":
            family = self.cfg.model.family
            raise ConfigError(f"objective clm trains a decoder but model.family is {family!r}; "
                              "use a gpt preset (e.g. gpt-small) or --objective mlm")
        return super().build_model()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask"))  # (B, T, V)
        return lm_loss(logits, batch["labels"])

    def eval_stats(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """{"bytes": UTF-8 bytes of the batch's targets} (none without a tokenizer)."""
        if self.tokenizer is None:
            return {}
        if not hasattr(self, "_byte_lengths"):
            table = self.tokenizer.byte_lengths()
            self._byte_lengths = None if table is None else torch.tensor(table)
        labels = batch["labels"].cpu()
        if self._byte_lengths is not None:  # exact, even for a character cut between two rows
            return {"bytes": int(self._byte_lengths[labels[labels != IGNORE_INDEX]].sum())}
        n_bytes = 0
        for row in labels.tolist():
            ids = [i for i in row if i != IGNORE_INDEX]
            n_bytes += len(self.tokenizer.decode(ids, skip_special_tokens=True).encode("utf-8"))
        return {"bytes": n_bytes}

    def metrics(self, stats: dict[str, float], loss_sum: float, n_targets: int) -> dict[str, float]:
        n_bytes = stats.get("bytes", 0)
        if n_bytes == 0:
            return {}
        return {"bpb": loss_sum / math.log(2) / n_bytes, "bytes_per_token": n_bytes / max(1, n_targets)}
