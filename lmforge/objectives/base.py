"""The seam between the one Trainer and what it optimizes: `Objective` and `Stream`.

An objective knows three things the Trainer does not:
  1. which network to build for it (`build_model`),
  2. how to turn the token shards into batches (`stream`),
  3. how to score a batch (`loss` -> (sum of per-target losses, number of targets)).

The Trainer never looks inside a batch except through `count_targets` (so it can count the targets
of a whole accumulation cycle *before* the first backward) and `n_tokens` (for tokens/s).
Batches are `dict[str, Tensor]`; the convention is that `labels` holds target ids with -100 at
positions that are not scored, so the defaults below work for every token-level objective.

Adding an objective = a subclass here + a line in `lmforge/objectives/__init__.py:OBJECTIVES`:

    class MyObjective(Objective):
        name = "mine"
        def stream(self, split, batch_size, seed, rank=0, world_size=1): ...
        def loss(self, model, batch): ...
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

IGNORE_INDEX = -100  # label value for positions that are not scored (PyTorch's cross_entropy default)


@runtime_checkable
class Stream(Protocol):
    """An iterator of batches with an exact, JSON-able position: endless for "train"; other splits
    end after one pass (evaluation reads each val example once), their last batch possibly short.

    Restoring `state_dict()` into a fresh stream built with the same arguments must make it yield
    exactly the batches the original would have yielded next (this is what makes resume exact).
    """

    def __iter__(self) -> Iterator[dict[str, Tensor]]: ...
    def __next__(self) -> dict[str, Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


def ends_after_one_pass(split: str, asked: bool | None) -> bool:
    """Whether a stream of `split` ends after one pass: `asked`, else every split but "train"."""
    return split != "train" if asked is None else asked


class Objective:
    """Base class. `cfg` is the RunConfig, `tokenizer` an lmforge Tokenizer (may be None in tests)."""

    name: str = "base"
    min_seq_len: int = 1  # the shortest data.seq_len its batches can be built from

    def __init__(self, cfg, tokenizer=None):
        self.cfg = cfg
        self.tokenizer = tokenizer

    # --- what to build -------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        """The network this objective trains, from cfg.model (family picked by the store's registry)."""
        from lmforge.models.store import build_model

        return build_model(self.cfg.model)

    @property
    def seq_len(self) -> int:
        return self.cfg.data.seq_len or self.cfg.model.max_seq_len

    # --- data ----------------------------------------------------------------------------------
    def stream(self, split: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
               one_pass: bool | None = None) -> Stream:
        """Batches of `split`. one_pass: end after one pass over the split (default: every split but
        "train", which runs on forever); `lmforge eval` asks for one pass of any split."""
        raise NotImplementedError

    # --- scoring -------------------------------------------------------------------------------
    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(sum of per-target losses as an fp32 scalar, number of targets) for one batch."""
        raise NotImplementedError

    def count_targets(self, batch: dict[str, Tensor]) -> int:
        """Targets `loss` will score in this batch, known before the forward pass.

        Must equal the `n` that `loss` returns (the Trainer checks). Override when an objective
        scores something other than `labels != -100` (e.g. one NSP label per sequence).
        """
        return int((batch["labels"] != IGNORE_INDEX).sum())

    def n_tokens(self, batch: dict[str, Tensor]) -> int:
        """Input tokens in the batch (for tokens/s): the size of `input_ids`."""
        return batch["input_ids"].numel()

    def eval_stats(self, batch: dict[str, Tensor]) -> dict[str, float]:
        """Numbers of one evaluated batch that `metrics` needs summed over the eval (clm: the bytes
        its targets stand for). Sums, not batches, are kept: an eval of a whole split stays small."""
        return {}

    def metrics(self, stats: dict[str, float], loss_sum: float, n_targets: int) -> dict[str, float]:
        """Extra eval numbers from the summed `eval_stats` (e.g. bits per byte). Default none."""
        return {}


def to_device(batch: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
