"""Next-sentence-prediction pairs for objective mlm,nsp (original BERT): documents -> masked batches.

    mlm,nsp   [CLS] A [SEP] B [SEP] built per document (`nsp_pairs`): a document is cut into
              segments at sentence-ending tokens (". ! ?"; over-long sentences into fixed chunks
              of (max_len - 3) // 2 tokens); consecutive segments are gathered into a chunk of up
              to max_len - 3 tokens (for a fraction train.short_seq_prob of the documents, 0.1 as
              in BERT, up to a random length in [2, max_len - 3] instead) and split at a random
              segment boundary into A and B. With probability 1/2 B is replaced by segments from a
              random *other* document (label 1, HF's convention; 0 = B really follows A). The pair
              is truncated longest-first, a token at a time from its front or end at random, to
              fit; segment ids are 0 for [CLS] A [SEP], 1 for B [SEP]; batches are padded with
              [PAD] to the longest example and carry an attention mask.

Masking and the loss are mlm.py's (`Masker`, `MaskedLMWithNSP`); this module builds the pairs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lmforge.errors import ConfigError, DataError
from lmforge.objectives.mlm import Masker, _seed, _split_code

SENTENCE_END = (".", "!", "?")


def split_segments(tokens: list[int], enders: set[int], max_piece: int) -> list[list[int]]:
    """Cut a document into sentences after each ender id; long sentences into max_piece chunks.

    >>> split_segments([5, 6, 1, 7, 1, 8, 9, 9, 9], {1}, 3)
    [[5, 6, 1], [7, 1], [8, 9, 9], [9]]
    """
    out: list[list[int]] = []
    cur: list[int] = []
    for t in tokens:
        cur.append(t)
        if t in enders:
            out.append(cur)
            cur = []
    if cur:
        out.append(cur)
    return [s[i : i + max_piece] for s in out for i in range(0, len(s), max_piece)]


def truncate_pair(a: list[int], b: list[int], max_tokens: int, rng: np.random.Generator | None = None
                  ) -> tuple[list[int], list[int]]:
    """Drop tokens from the longer segment until len(a) + len(b) <= max_tokens (BERT).

    Without `rng` from the end; with it, from the front or the end with probability 1/2 each token,
    as BERT's truncate_seq_pair does ("to add more randomness and avoid biases").
    """
    a, b = list(a), list(b)
    while len(a) + len(b) > max_tokens:
        longer = a if len(a) > len(b) else b
        if rng is not None and rng.random() < 0.5:
            del longer[0]
        else:
            longer.pop()
    return a, b


def nsp_pairs(
    doc_index: int,
    segments: list[list[int]],
    random_segments,
    rng: np.random.Generator,
    max_len: int,
    short_seq_prob: float = 0.0,
) -> list[tuple[list[int], list[int], int]]:
    """Pairs (A, B, label) from one document's segments; label 0 = B follows A, 1 = B is random.

    random_segments(exclude) -> segments of a random document other than `exclude`.
    As BERT's create_pretraining_data: chunks of consecutive segments up to a target of max_len - 3
    tokens are split at a random boundary; a random B's unused segments go back to the document.
    With probability short_seq_prob the document's target is a uniform length in [2, max_len - 3]
    instead (shorter sequences, so the model also sees lengths it meets at fine-tuning time); pairs
    are always truncated to max_len - 3, longest segment first, from its front or end at random.
    short_seq_prob=0 draws nothing extra from `rng`.
    """
    max_tokens = max_len - 3  # [CLS] A [SEP] B [SEP]
    target = max_tokens
    if short_seq_prob > 0 and rng.random() < short_seq_prob:
        target = int(rng.integers(2, max_tokens + 1))
    out = []
    chunk: list[list[int]] = []
    i = 0
    while i < len(segments):
        chunk.append(segments[i])
        last = i == len(segments) - 1
        if last or sum(map(len, chunk)) >= target:
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) >= 2 else 1
            a = [t for s in chunk[:a_end] for t in s]
            if len(chunk) == 1 or rng.random() < 0.5:
                label = 1
                other = random_segments(doc_index)
                start = int(rng.integers(len(other)))
                b: list[int] = []
                for s in other[start:]:
                    b += s
                    if len(b) >= target - len(a):
                        break
                i -= len(chunk) - a_end  # the segments B did not use go back (BERT)
            else:
                label = 0
                b = [t for s in chunk[a_end:] for t in s]
            a, b = truncate_pair(a, b, max_tokens, rng)
            if a and b:
                out.append((a, b, label))
            chunk = []
        i += 1
    return out


def encode_pair(a: list[int], b: list[int], cls_id: int, sep_id: int) -> tuple[list[int], list[int]]:
    """[CLS] A [SEP] B [SEP] and its segment ids.

    >>> encode_pair([7, 8], [9], cls_id=2, sep_id=3)
    ([2, 7, 8, 3, 9, 3], [0, 0, 0, 0, 1, 1])
    """
    ids = [cls_id, *a, sep_id, *b, sep_id]
    return ids, [0] * (len(a) + 2) + [1] * (len(b) + 1)


def pad_batch(seqs: list[list[int]], types: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest: input_ids, token_type_ids, attention_mask, all (B, T) int64."""
    T = max(map(len, seqs))
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    tt = torch.zeros((len(seqs), T), dtype=torch.long)
    am = torch.zeros((len(seqs), T), dtype=torch.long)
    for r, (s, t) in enumerate(zip(seqs, types)):
        ids[r, : len(s)] = torch.tensor(s)
        tt[r, : len(t)] = torch.tensor(t)
        am[r, : len(s)] = 1
    return {"input_ids": ids, "token_type_ids": tt, "attention_mask": am}


def load_starts(path: Path, n_tokens: int) -> np.ndarray:
    """docs.npy -> int64 (n_docs,) document starts, sorted, in [0, n_tokens]; else a DataError."""
    def corrupt(why: str) -> DataError:
        return DataError(f"{path} is corrupt ({why}); re-run `lmforge prepare`")

    try:
        starts = np.load(path, allow_pickle=False)
    except Exception as e:  # numpy raises several types for a broken file
        raise corrupt(f"unreadable: {e.__class__.__name__}") from None
    if not (isinstance(starts, np.ndarray) and starts.ndim == 1 and starts.dtype.kind in "iu"):
        raise corrupt("not a 1-D integer array")
    starts = starts.astype(np.int64)
    if len(starts) and (starts[0] < 0 or starts[-1] > n_tokens or (np.diff(starts) < 0).any()):
        raise corrupt(f"offsets not sorted in [0, {n_tokens}]")
    return starts


class SplitDocuments:
    """The documents of one split of a shard folder: len(), segments(i) -> that document's sentences."""

    def __init__(self, shard_dir: str | Path, split: str, enders: set[int], max_piece: int):
        from lmforge.data.loader import TokenStream

        self.stream = TokenStream(shard_dir, split)
        docs = Path(shard_dir) / split / "docs.npy"
        if not docs.is_file():
            raise DataError(f"{docs} is missing; NSP needs document boundaries: re-run `lmforge prepare`")
        self.starts = load_starts(docs, len(self.stream))  # (n_docs,) start offsets in the split stream
        self.ends = np.append(self.starts[1:], len(self.stream))
        self.separator = self.stream.meta.get("separator_id")
        self.enders, self.max_piece = enders, max_piece

    def __len__(self) -> int:
        return len(self.starts)

    def tokens(self, i: int) -> list[int]:
        """Document i without its trailing separator."""
        ids = self.stream[int(self.starts[i]) : int(self.ends[i])]
        self.stream.check_ids(ids)
        out = ids.tolist()
        if out and out[-1] == self.separator:
            out.pop()
        return out

    def segments(self, i: int) -> list[list[int]]:
        return split_segments(self.tokens(i), self.enders, self.max_piece)


class NSPStream:
    """Documents -> NSP pairs -> padded, masked batches {input_ids, token_type_ids, attention_mask,
    labels, next_sentence_label}. Position = (epoch, cursor into this rank's documents, pairs of the
    current document already used, batches), so resume regenerates the current document exactly.
    With `epochs` set the stream ends after that many passes, its last batch possibly short."""

    def __init__(self, docs: SplitDocuments, masker: Masker, tokenizer, max_len: int, batch_size: int,
                 seed: int, rank: int, world_size: int, shuffle: bool, split: str,
                 short_seq_prob: float = 0.0, epochs: int | None = None):
        if epochs is not None and epochs < 1:
            raise ConfigError(f"epochs must be >= 1 (or None: endless), got {epochs}")
        if len(docs) < 2:
            raise DataError(f"next-sentence prediction needs >= 2 documents in the {split!r} split, "
                            f"found {len(docs)}; use objective mlm or more documents")
        self.docs, self.masker, self.max_len, self.batch_size = docs, masker, max_len, batch_size
        self.short_seq_prob, self.epochs = short_seq_prob, epochs
        self.cls_id, self.sep_id, self.pad_id = tokenizer.cls_id, tokenizer.sep_id, tokenizer.pad_id
        self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle
        self.code = _split_code(split)
        self.epoch = self.cursor = self.offset = self.batches = 0
        self._pairs: list | None = None  # pairs of the document at `cursor`

    def _order(self) -> np.ndarray:
        n = len(self.docs)
        if not self.shuffle:
            return np.arange(n)[self.rank :: self.world_size]
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n)
        return order[self.rank :: self.world_size]

    def _doc_pairs(self, doc: int) -> list:
        rng = np.random.default_rng([self.seed, self.code, self.epoch, doc])

        def random_segments(exclude: int) -> list[list[int]]:
            j = int(rng.integers(len(self.docs) - 1))
            return self.docs.segments(j + (j >= exclude)) or [[self.sep_id]]

        segments = self.docs.segments(doc)
        return nsp_pairs(doc, segments, random_segments, rng, self.max_len, self.short_seq_prob)

    def _next_pair(self) -> tuple[list[int], list[int], int]:
        empty_docs = 0
        while True:
            order = self._order()
            if self.cursor >= len(order):
                if self.epochs is not None and self.epoch + 1 >= self.epochs:
                    raise StopIteration
                self.epoch, self.cursor, self.offset, self._pairs = self.epoch + 1, 0, 0, None
                continue
            if self._pairs is None:
                self._pairs = self._doc_pairs(int(order[self.cursor]))
            if self.offset < len(self._pairs):
                self.offset += 1
                return self._pairs[self.offset - 1]
            empty_docs = empty_docs + 1 if not self._pairs else 0
            if empty_docs > len(self.docs):
                raise DataError("no document is long enough to make a sentence pair; use objective mlm")
            self.cursor, self.offset, self._pairs = self.cursor + 1, 0, None

    def __iter__(self) -> NSPStream:
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        seqs, types, nsp = [], [], []
        for _ in range(self.batch_size):
            try:
                a, b, label = self._next_pair()
            except StopIteration:
                if not seqs:
                    raise
                break  # the last pass ended mid-batch: a short batch
            ids, tt = encode_pair(a, b, self.cls_id, self.sep_id)
            seqs.append(ids)
            types.append(tt)
            nsp.append(label)
        batch = pad_batch(seqs, types, self.pad_id)
        batch["input_ids"], batch["labels"] = self.masker(
            batch["input_ids"], _seed(self.seed, self.rank, self.code, self.batches))
        batch["next_sentence_label"] = torch.tensor(nsp)
        self.batches += 1
        return batch

    def setup(self) -> dict:
        """What shapes the pairs and their order; see TokenWindows.setup."""
        return {"seed": self.seed, "seq_len": self.max_len, "rank": self.rank, "world_size": self.world_size,
                "shuffle": self.shuffle, "n_docs": len(self.docs), "n_tokens": len(self.docs.stream)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "cursor": self.cursor, "offset": self.offset, "batches": self.batches,
                **self.setup()}

    def load_state_dict(self, state: dict) -> None:
        from lmforge.data.loader import check_setup

        check_setup(state, self.setup())
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self.offset, self.batches = int(state["offset"]), int(state["batches"])
        self._pairs = None
