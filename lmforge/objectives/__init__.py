"""Objectives: what the one Trainer optimizes. An objective builds batches and scores a model.

    objective = make_objective(cfg, tokenizer)      # cfg.train.objective picks the class
    stream = objective.stream("train", batch_size=16, seed=0)
    loss_sum, n_targets = objective.loss(model, next(stream))

Adding a task (classification, QA, seq2seq, SFT) means adding a class here, never a new loop.
"""

from __future__ import annotations

import importlib

from lmforge.errors import ConfigError

OBJECTIVES = {
    "clm": "lmforge.objectives.clm:CausalLM",
    "mlm": "lmforge.objectives.mlm:MaskedLM",
    "mlm,nsp": "lmforge.objectives.mlm:MaskedLMWithNSP",
}


def objective_class(name: str) -> type:
    if name not in OBJECTIVES:
        raise ConfigError(f"unknown objective {name!r}; choose one of: {', '.join(OBJECTIVES)}")
    module, cls = OBJECTIVES[name].split(":")
    return getattr(importlib.import_module(module), cls)


def make_objective(cfg, tokenizer):
    """cfg: RunConfig; tokenizer: lmforge.tokenizer.Tokenizer."""
    return objective_class(cfg.train.objective)(cfg, tokenizer)
