"""The tiktoken fast path of `lmforge prepare`, and the guard that checks it before use.

Byte-level BPE tokenizers (what `tokenizer train --type bpe` makes) are encoded with `tiktoken`, 2-4x the
speed of `tokenizers`. `fast_encoding` rebuilds such a tokenizer as a `tiktoken.Encoding`: its vocabulary
mapped back to raw bytes through GPT-2's byte alphabet (`byte_alphabet`), GPT-2's regex, and ranks in
merge order. The two can still differ when tiktoken reaches a token through a pair that is not in the
merge list, so before use the fast path is checked id-for-id against `tokenizers` (`check_fast_path`)
on probe strings (`PROBES`) and on the first ~300 kB of the input (`GUARD_CHARS`); on any difference
prepare prints a note and uses `tokenizers`.

`Encoder` runs either backend in prepare's worker processes: documents -> ids, separator after each.
"""

from __future__ import annotations

import json

import numpy as np

from lmforge.tokenizer import Tokenizer

GUARD_CHARS = 300_000  # the fast path is verified against `tokenizers` on about this much input
PROBES = [
    "Hello world! It's 2024; they'll've  done it -- isn't it?\n\n\tTabs\t\tand   spaces   ",
    "中文测试：今天天气很好。日本語のテキスト、한국어 텍스트",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 flags 🇫🇷, accents éàü ñ ﬁ, math ∑∫√ and 12345678901234567890",
    "    def f(x):\n        return x**2  # comment\r\n\r\n\n\n   \u00a0 \u3000 end",
    "I'm you're we've he'd she'll 'S 'T 'RE ''ll 3.14159 1,000,000 $5.00 <|endoftext|> x<|im_start|>y",
]


def byte_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-in character for each byte, reversed: char -> byte value.

    >>> byte_alphabet()["Ġ"], byte_alphabet()["a"]
    (32, 97)
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + n)] = b
            n += 1
    return chars


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


def fast_encoding(tok: Tokenizer):
    """(tiktoken.Encoding, lut) reproducing a byte-level BPE tokenizer, or (None, reason).

    tiktoken ranks tokens, HF ranks merge pairs; we give the token made by merge i the rank 256 + i
    (single bytes 0..255, specials after), so both apply merges in the same order, and map tiktoken's
    ranks back to our ids with `lut[ranks]`. They can still differ when tiktoken reaches a token
    through a pair that is not in the merge list, hence `check_fast_path`.
    """
    spec = json.loads(tok.inner.to_str())
    model, pre = spec["model"], spec.get("pre_tokenizer") or {}
    if model["type"] != "BPE" or spec.get("normalizer") is not None:
        return None, "not a byte-level BPE without normalizer"
    if pre.get("type") != "ByteLevel" or pre.get("add_prefix_space") or not pre.get("use_regex", True):
        return None, "pre-tokenizer is not GPT-2's ByteLevel regex"
    if model.get("dropout") or model.get("continuing_subword_prefix") or model.get("end_of_word_suffix"):
        return None, "BPE options tiktoken does not have (dropout / affixes)"
    import tiktoken

    alphabet = byte_alphabet()
    vocab = model["vocab"]
    to_bytes = lambda s: bytes(alphabet[c] for c in s)
    try:
        ranks: dict[bytes, int] = {}
        rank_to_id = [0] * 256
        for c, b in alphabet.items():
            if c not in vocab:
                return None, f"byte {b} missing from the vocabulary"
            ranks[bytes([b])] = b
            rank_to_id[b] = vocab[c]
        for a, b in (m.split(" ", 1) if isinstance(m, str) else m for m in model["merges"]):
            merged = to_bytes(a + b)
            if merged not in ranks and (a + b) in vocab:
                ranks[merged] = len(rank_to_id)
                rank_to_id.append(vocab[a + b])
    except KeyError:
        return None, "vocabulary holds non byte-level tokens"
    specials = {}
    for t in spec.get("added_tokens", []):
        specials[t["content"]] = len(rank_to_id)
        rank_to_id.append(t["id"])
    enc = tiktoken.Encoding(
        "lmforge", pat_str=GPT2_PATTERN, mergeable_ranks=ranks, special_tokens=specials
    )
    return enc, np.asarray(rank_to_id, dtype=np.uint32)


class Encoder:
    """documents -> one id array with the separator after each document, and per-document lengths.

    backend 'tiktoken' (byte-level BPE fast path) or 'tokenizers'. Built from the tokenizer JSON so
    that worker processes can rebuild it.

    >>> ids, lengths = Encoder(tok_json, "tokenizers").encode(["a b", "c"])   # "a" "Ġb" <sep> "c" <sep>
    >>> ids.tolist(), lengths.tolist()
    ([67, 271, 0, 69, 0], [3, 2])
    """

    def __init__(self, tok_json: str, backend: str):
        from tokenizers import Tokenizer as HF

        self.tok = Tokenizer(HF.from_str(tok_json))
        self.sep = self.tok.separator_id
        self.backend = backend
        if backend == "tiktoken":
            self.enc, self.lut = fast_encoding(self.tok)
            assert self.enc is not None, self.lut
            self.allowed = frozenset(self.enc.special_tokens_set)

    def encode_lists(self, docs: list[str]) -> list[np.ndarray]:
        if self.backend == "tiktoken":
            return [self.lut[self.enc.encode_to_numpy(d, allowed_special=self.allowed)] for d in docs]
        return [np.asarray(e.ids, dtype=np.uint32) for e in self.tok.inner.encode_batch_fast(
            docs, add_special_tokens=False)]

    def encode(self, docs: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = self.encode_lists(docs)
        lengths = np.fromiter((len(p) + 1 for p in parts), dtype=np.int64, count=len(parts))
        out = np.empty(int(lengths.sum()), dtype=np.uint32)
        ends = np.cumsum(lengths)
        out[ends - 1] = self.sep
        for p, end in zip(parts, ends):
            out[end - 1 - len(p): end - 1] = p
        return out, lengths


def check_fast_path(tok: Tokenizer, docs: list[str]) -> str | None:
    """None when tiktoken gives exactly the ids of `tokenizers` on PROBES + docs, else what differed."""
    enc = Encoder(tok.inner.to_str(), "tiktoken")
    sample = PROBES + docs
    fast = enc.encode_lists(sample)
    slow = tok.encode_batch(sample)
    for i, (a, b) in enumerate(zip(fast, slow)):
        if a.tolist() != b:
            which = f"probe {i}" if i < len(PROBES) else f"document {i - len(PROBES)}"
            return f"{which} encodes differently"
    return None
