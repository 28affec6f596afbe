"""Masked LM (BERT / RoBERTa style) and MLM + next-sentence prediction (original BERT).

Masking (Devlin et al. 2018, section 3.1), `mask_tokens`:
    each non-special token is *selected* with probability `mlm_prob` (15%); of the selected,
    80% become [MASK], 10% a random non-special token, 10% stay unchanged. [CLS] [SEP] [PAD]
    (every special id of the tokenizer except [UNK]) are never selected. Labels are -100
    everywhere except the selected positions, which hold the original id. A row with no
    selection gets its lowest-scoring eligible word selected, so every example has >= 1 target.
    Whole-word masking: WordPiece continuation pieces (`##xx`) share the fate (selected or not)
    of the word they continue; the 80/10/10 choice stays per token, as in Google's reference.

Examples:
    mlm       [CLS] + (seq_len - 2) tokens of the packed token stream + [SEP]; documents inside a
              window stay separated by the shards' [SEP] (RoBERTa "full sentences" packing).
    mlm,nsp   [CLS] A [SEP] B [SEP] sentence pairs built per document: see nsp.py.

Loss (`loss`): mlm: (sum of MLM cross-entropy over the selected tokens, n = selected tokens).
mlm,nsp: each pair counts as `w` targets, w = train.nsp_weight, by default round(mlm_prob *
seq_len) (19 at seq 128, 77 at 512: about the tokens a full-length pair gets selected, and close
to BERT's max_predictions_per_seq of 20 / 76):
    loss_sum = sum_mlm + w * sum_nsp,    n = n_mlm + w * n_pairs.
With w = n_mlm / n_pairs, loss_sum / n = (mean_mlm + mean_nsp) / 2, half of HF BertForPreTraining's
`mean MLM CE + mean NSP CE`: the two tasks weigh alike (w = 1 would give NSP ~1/20 of its weight).
w is a constant known before the forward (`count_targets`), so every target keeps a fixed weight
and the Trainer's sum / n over an accumulation cycle still equals the big-batch loss exactly, which
a per-batch mean of means would not.

Streams are deterministic for (seed, rank, world_size) and resumable: their state is a few
integers, and each batch's masking uses a generator seeded from (seed, rank, batch index).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import ConfigError, DataError
from lmforge.objectives.base import IGNORE_INDEX, Objective, ends_after_one_pass
from lmforge.objectives.clm import cross_entropy_sum

IGNORE = IGNORE_INDEX


# ---------------------------------------------------------------------------------------------
# masking


def mask_tokens(
    ids: torch.Tensor,
    *,
    mask_id: int,
    special_ids: torch.Tensor,
    random_ids: torch.Tensor,
    mlm_prob: float = 0.15,
    generator: torch.Generator | None = None,
    continuation: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking of a batch. Returns (masked input ids, labels), both (B, T) int64.

    ids: (B, T) token ids; special_ids: 1-D ids never selected; random_ids: 1-D ids a "random
    token" is drawn from; continuation: optional (V,) bool table, True for `##` pieces (turns on
    whole-word masking). Random draws, in order: scores (B, T), 80/10/10 dice (B, T), random
    token indices (B, T), all from `generator`.

    >>> g = torch.Generator().manual_seed(0)
    >>> x, y = mask_tokens(torch.tensor([[2, 10, 11, 12, 3]]), mask_id=4,
    ...                    special_ids=torch.tensor([0, 2, 3, 4]), random_ids=torch.arange(5, 20),
    ...                    mlm_prob=0.5, generator=g)
    >>> x.tolist(), y.tolist()
    ([[2, 10, 11, 4, 3]], [[-100, -100, 11, 12, -100]])
    """
    B, T = ids.shape
    special = torch.isin(ids, special_ids)  # (B, T)
    score = torch.rand(B, T, generator=generator)
    if continuation is not None:
        # every piece takes the score of its word's first piece: index of the latest word start
        starts = ~continuation[ids] | special  # (B, T)
        pos = torch.arange(T).expand(B, T)
        first = torch.where(starts, pos, torch.zeros_like(pos)).cummax(dim=1).values
        score = score.gather(1, first)
    score = score.masked_fill(special, 2.0)  # never selected
    selected = score < mlm_prob
    # at least one target per row that has any eligible token: its lowest-scoring word
    lowest = score == score.min(dim=1, keepdim=True).values
    selected |= lowest & ~selected.any(dim=1, keepdim=True) & ~special
    dice = torch.rand(B, T, generator=generator)
    rand_tok = random_ids[torch.randint(len(random_ids), (B, T), generator=generator)]
    out = ids.clone()
    out[selected & (dice < 0.8)] = mask_id
    use_rand = selected & (dice >= 0.8) & (dice < 0.9)
    out[use_rand] = rand_tok[use_rand]
    labels = torch.where(selected, ids, torch.full_like(ids, IGNORE))
    return out, labels


def special_id_tensor(tokenizer) -> torch.Tensor:
    """All special ids of a Tokenizer except [UNK] (which BERT masks like any word)."""
    names = ("pad_id", "cls_id", "sep_id", "mask_id", "bos_id", "eos_id")
    ids = {getattr(tokenizer, n, None) for n in names} - {None}
    return torch.tensor(sorted(ids), dtype=torch.long)


def continuation_table(tokenizer) -> torch.Tensor:
    """(V,) bool, True for WordPiece continuation pieces (`##ing`), for whole-word masking."""
    table = torch.zeros(tokenizer.vocab_size, dtype=torch.bool)
    for tok, i in tokenizer.inner.get_vocab().items():
        if tok.startswith("##") and i < len(table):
            table[i] = True
    return table


# ---------------------------------------------------------------------------------------------
# streams


def _seed(*parts: int) -> int:
    """A 63-bit generator seed from integers (seed, rank, batch index, ...), stable across runs."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(2, np.uint64)[0] >> 1)


def _split_code(split: str) -> int:
    return sum(ord(c) * 31**i for i, c in enumerate(split)) % 2**31


class Masker:
    """mask_tokens with a tokenizer's ids bound; batch i of a stream uses _seed(seed, rank, split, i)."""

    def __init__(self, tokenizer, mlm_prob: float, whole_word: bool):
        if tokenizer is None or tokenizer.mask_id is None:
            raise DataError("masked LM needs a tokenizer with [MASK]; train one with "
                            "`lmforge tokenizer train --type wordpiece`")
        self.mask_id = tokenizer.mask_id
        self.special = special_id_tensor(tokenizer)
        vocab = torch.arange(tokenizer.vocab_size)
        self.random_ids = vocab[~torch.isin(vocab, self.special)]
        self.continuation = continuation_table(tokenizer) if whole_word else None
        self.mlm_prob = mlm_prob

    def __call__(self, ids: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return mask_tokens(ids, mask_id=self.mask_id, special_ids=self.special, random_ids=self.random_ids,
                           mlm_prob=self.mlm_prob, generator=g, continuation=self.continuation)


class MLMStream:
    """TokenWindows (B, L-2) -> [CLS] window [SEP], masked: {input_ids, labels} (B, L)."""

    def __init__(self, windows, masker: Masker, cls_id: int, sep_id: int, seed: int, rank: int, split: str):
        self.windows, self.masker = windows, masker
        self.cls_id, self.sep_id = cls_id, sep_id
        self.key = (seed, rank, _split_code(split))
        self.batches = 0

    def __iter__(self) -> MLMStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        w = next(self.windows)  # (B, L-2)
        B = w.shape[0]
        ids = torch.cat([torch.full((B, 1), self.cls_id), w.long(), torch.full((B, 1), self.sep_id)], 1)
        x, y = self.masker(ids, _seed(*self.key, self.batches))
        self.batches += 1
        return {"input_ids": x, "labels": y}

    def state_dict(self) -> dict:
        return {"windows": self.windows.state_dict(), "batches": self.batches}

    def load_state_dict(self, state: dict) -> None:
        self.windows.load_state_dict(state["windows"])
        self.batches = int(state["batches"])


# ---------------------------------------------------------------------------------------------
# objectives


class MaskedLM(Objective):
    """objective mlm: BERT masking over packed windows; scores the selected tokens only."""

    name = "mlm"
    min_seq_len = 4  # windows of seq_len - 3 (>= 1) tokens, then [CLS] ... [SEP]
    heads = "mlm"

    def build_model(self) -> nn.Module:
        """A BERT with exactly this objective's heads (mlm: no pooler / NSP, so no unused parameters)."""
        from lmforge.models.store import build_model

        if self.cfg.model.family != "bert":
            raise ConfigError(f"objective {self.name} trains an encoder; set model.family=bert "
                              "(e.g. the preset bert-small)")
        return build_model(dataclasses.replace(self.cfg.model, heads=self.heads))

    def masker(self) -> Masker:
        return Masker(self.tokenizer, self.cfg.train.mlm_prob, self.cfg.train.whole_word_mask)

    def stream(self, split: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
               one_pass: bool | None = None):
        from lmforge.data.loader import TokenWindows

        if self.seq_len < self.min_seq_len:
            raise ConfigError(f"data.seq_len={self.seq_len} is too short for [CLS] ... [SEP]; "
                              f"use >= {self.min_seq_len}")
        windows = TokenWindows(self.cfg.data.shards, split, self.seq_len - 3, batch_size, seed,
                               rank=rank, world_size=world_size, shuffle=split == "train",
                               epochs=1 if ends_after_one_pass(split, one_pass) else None)
        tok = self.tokenizer
        return MLMStream(windows, self.masker(), tok.cls_id, tok.sep_id, seed, rank, split)

    def _forward_mlm(self, model: nn.Module, batch: dict[str, Tensor]):
        """One forward: (model output, summed MLM cross-entropy, number of selected tokens)."""
        labels = batch["labels"]  # (B, T)
        pos = labels != IGNORE_INDEX
        out = model(batch["input_ids"], token_type_ids=batch.get("token_type_ids"),
                    attention_mask=batch.get("attention_mask"), mlm_positions=pos)
        loss = cross_entropy_sum(out.mlm_logits, labels[pos])  # (N, V) vs (N,), fp32 math
        return out, loss, pos.sum()

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        _, loss, n = self._forward_mlm(model, batch)
        return loss, n

    def n_tokens(self, batch: dict[str, Tensor]) -> int:
        am = batch.get("attention_mask")
        return batch["input_ids"].numel() if am is None else int(am.sum())


class MaskedLMWithNSP(MaskedLM):
    """objective mlm,nsp: [CLS] A [SEP] B [SEP] pairs from documents; MLM + next-sentence prediction."""

    name = "mlm,nsp"
    min_seq_len = 8  # [CLS] A [SEP] B [SEP] with room for both segments
    heads = "mlm,nsp"

    def stream(self, split: str, batch_size: int, seed: int, rank: int = 0, world_size: int = 1,
               one_pass: bool | None = None):
        # imported here, not at the top: nsp.py imports this module's Masker
        from lmforge.objectives.nsp import SENTENCE_END, NSPStream, SplitDocuments

        tok = self.tokenizer
        if self.seq_len < self.min_seq_len:
            raise ConfigError(f"data.seq_len={self.seq_len} is too short for sentence pairs; "
                              f"use >= {self.min_seq_len}")
        if self.cfg.model.type_vocab_size < 2:  # sentence B's segment id 1 needs a row of its own
            raise ConfigError(f"objective mlm,nsp needs model.type_vocab_size >= 2 (segments A and B), got "
                              f"{self.cfg.model.type_vocab_size}; use objective mlm")
        enders = {i for i in (tok.token_to_id(t) for t in SENTENCE_END) if i is not None}
        docs = SplitDocuments(self.cfg.data.shards, split, enders, max_piece=(self.seq_len - 3) // 2)
        return NSPStream(docs, self.masker(), tok, self.seq_len, batch_size, seed, rank, world_size,
                         shuffle=split == "train", split=split, short_seq_prob=self.cfg.train.short_seq_prob,
                         epochs=1 if ends_after_one_pass(split, one_pass) else None)

    @property
    def nsp_weight(self) -> int:
        """Targets one NSP pair counts as: train.nsp_weight, else round(mlm_prob * seq_len) (>= 1)."""
        w = self.cfg.train.nsp_weight
        return max(1, round(self.cfg.train.mlm_prob * self.seq_len)) if w is None else int(w)

    def loss(self, model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """(sum_mlm + w * sum_nsp, n_mlm + w * n_pairs), w = nsp_weight (module docstring)."""
        out, mlm_sum, n_mlm = self._forward_mlm(model, batch)
        nsp = batch["next_sentence_label"]  # (B,)
        nsp_sum = F.cross_entropy(out.nsp_logits.float(), nsp, reduction="sum")  # (B, 2) vs (B,)
        w = self.nsp_weight
        return mlm_sum + w * nsp_sum, n_mlm + w * nsp.numel()

    def count_targets(self, batch: dict[str, Tensor]) -> int:
        n_mlm = int((batch["labels"] != IGNORE_INDEX).sum())
        return n_mlm + self.nsp_weight * batch["next_sentence_label"].numel()
