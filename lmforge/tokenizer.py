"""Tokenizers: a thin wrapper over the `tokenizers` library (its CLI: lmforge/tokenizer_cli.py).

Three families, each with the special tokens its models expect:

    bpe        byte-level BPE (GPT-2 style); <|endoftext|> is eos, bos and pad; chat markers
               <|im_start|> <|im_end|>. Lossless: decode(encode(text)) == text for any text.
    wordpiece  BERT style; [PAD] [UNK] [CLS] [SEP] [MASK]; BertNormalizer (optional lowercase,
               CJK characters split one per word) and a "[CLS] A [SEP] B [SEP]" post-processor.
    unigram    T5 style (SentencePiece unigram over "▁"-marked words); <pad> </s> <unk> and
               sentinels <extra_id_0>..<extra_id_{N-1}>; "A </s>" post-processor.

Training streams documents through `lmforge.data.readers.iter_documents`, so the corpus is never
held in memory (WordPiece reads it twice, to be reproducible; see `_train_wordpiece`); a word longer
than MAX_TRAIN_WORD reaches the trainer in pieces (`capped`), which encoding never does. The result
is one `tokenizer.json` that `transformers.PreTrainedTokenizerFast` loads as is.

    >>> tok = Tokenizer.load("tok/")
    >>> tok.decode(tok.encode("héllo 世界 🙂"))
    'héllo 世界 🙂'
"""

from __future__ import annotations

import hashlib
import json
import sys
import tempfile
from collections.abc import Iterable, Iterator
from pathlib import Path

from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors, trainers
from tokenizers import Tokenizer as _HFTokenizer

from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.io import atomic_write_text

TYPES = ("bpe", "wordpiece", "unigram")
BPE_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
T5_SPECIALS = ["<pad>", "</s>", "<unk>"]
# the longest word (one piece of the pre-tokenizer's output; bytes for byte-level BPE) training sees: longer
# ones reach the trainer cut into pieces this long (`capped`). Uncut, `tokenizers` segfaults training Unigram
# on a ~65,000-character word and BPE takes minutes on a 400,000-character one. Normal text stays below, so
# trains exactly as uncut: the longest words of the named sources are 1,020 characters (a People's Daily
# paragraph: one Unigram word, Chinese has no spaces) and 2,883 bytes (BPE, the same corpus)
MAX_TRAIN_WORD = 4096

# role -> token strings that play it, first match wins (covers our three families and common HF files)
_ROLES = {
    "eos": ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>"),
    "bos": ("<|endoftext|>", "<s>", "<bos>", "<|begin_of_text|>"),
    "pad": ("[PAD]", "<pad>", "<|endoftext|>"),
    "unk": ("[UNK]", "<unk>"),
    "cls": ("[CLS]",),
    "sep": ("[SEP]",),
    "mask": ("[MASK]", "<mask>"),
}


def _refuse_undecodable(texts: Iterable[str]) -> None:
    """DataError for text holding bytes that are not UTF-8: Python keeps them as lone surrogates (e.g. a
    command-line argument in another encoding), which `tokenizers` cannot take."""
    for text in texts:
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            byte = ord(text[e.start]) - 0xDC00 if 0xDC80 <= ord(text[e.start]) <= 0xDCFF else None
            what = f"byte 0x{byte:02x}" if byte is not None else repr(text[e.start])
            raise DataError(f"the text is not valid UTF-8 ({what} at character {e.start}): pass UTF-8 "
                            "text (e.g. convert it with iconv -t UTF-8)") from None


def post_processor_steps(spec: dict) -> list[dict]:
    """The post-processor steps of a tokenizer.json (parsed): the steps of a Sequence, the one, or none."""
    pp = spec.get("post_processor") or {}
    return pp.get("processors", []) if pp.get("type") == "Sequence" else [pp] if pp else []


class Tokenizer:
    """Our tokenizer: the `tokenizers.Tokenizer` in `.inner` plus the special ids the rest of lmforge uses.

    `encode` returns the raw ids of the text (no [CLS]/[SEP], no </s>); objectives add specials.

    >>> tok = Tokenizer.load("tok/tokenizer.json")      # a byte-level BPE from `tokenizer train`
    >>> tok.decode(tok.encode("Hello world"))
    'Hello world'
    >>> tok.eos_id, tok.sep_id, tok.separator_id
    (0, None, 0)
    """

    def __init__(self, inner: _HFTokenizer):
        self.inner = inner
        vocab = inner.get_vocab(with_added_tokens=True)
        for role, names in _ROLES.items():
            setattr(self, f"{role}_id", next((vocab[n] for n in names if n in vocab), None))
        self._vocab_size = max(vocab.values()) + 1 if vocab else 0
        self._kind = json.loads(inner.to_str())["model"]["type"].lower()
        self._extra_eos: list[int] = []

    # -- files -----------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer.json, or a folder holding one. Anything else is a CheckpointError."""
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise CheckpointError(f"no tokenizer at {path}; give a tokenizer.json or a folder holding one")
        try:
            inner = _HFTokenizer.from_file(str(file))
        except Exception:
            raise CheckpointError(
                f"{file} is not a tokenizer.json; train one with `lmforge tokenizer train`"
            ) from None
        return cls(inner)

    def save(self, path: str | Path) -> Path:
        """Write tokenizer.json (into `path` if it is a folder or has no .json suffix), atomically."""
        path = save_path(path)
        atomic_write_text(path, self.inner.to_str(pretty=True))
        return path

    # -- encode / decode -------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        try:
            return self.inner.encode(text, add_special_tokens=add_special_tokens).ids
        except TypeError:
            _refuse_undecodable([text])
            raise

    def encode_batch(self, texts: list[str], add_special_tokens: bool = False) -> list[list[int]]:
        try:
            return [e.ids for e in self.inner.encode_batch(texts, add_special_tokens=add_special_tokens)]
        except TypeError:
            _refuse_undecodable(texts)
            raise

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.inner.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.inner.token_to_id(token)

    def id_to_token(self, idx: int) -> str | None:
        return self.inner.id_to_token(idx)

    def encode_prompt(self, text: str) -> list[int]:
        """Ids for a generation prompt: the raw ids, with bos in front when the tokenizer's own
        post-processor puts it there (Llama / SentencePiece files: `tokenizer(text)` in HF starts
        with <s>), and bos alone for an empty prompt. Our BPE adds nothing, so prompts stay raw.
        A tokenizer without bos (Unigram, WordPiece) starts an empty prompt with the separator
        (eos or [SEP]): in the shards every document follows one."""
        ids = self.encode(text)
        if self.bos_id is not None and (not ids or self.prompts_start_with_bos()):
            ids = [self.bos_id] + ids
        elif not ids and self.stop_ids:
            ids = self.stop_ids[:1]
        return ids

    def prompts_start_with_bos(self) -> bool:
        """True when this tokenizer's own template puts bos before a text (Llama / SentencePiece files)."""
        if not hasattr(self, "_adds_bos"):
            steps = post_processor_steps(json.loads(self.inner.to_str()))
            first = [s["single"][0] for s in steps
                     if s.get("type") == "TemplateProcessing" and s.get("single")]
            name = self.id_to_token(self.bos_id) if self.bos_id is not None else None
            self._adds_bos = bool(first) and first[0].get("SpecialToken", {}).get("id") == name
        return self._adds_bos

    def byte_lengths(self) -> list[int] | None:
        """UTF-8 bytes each id stands for (0 for specials), when that is exact: byte-level BPE, where
        every character of a vocab entry is one byte. None for other families (WordPiece drops the
        spaces between words, Unigram's ▁ is a space only sometimes), whose byte counts need decoding.

        Summing these over a split window counts a character cut in two correctly, which decoding
        each window alone cannot (a lone half decodes to U+FFFD, 3 bytes).
        """
        spec = json.loads(self.inner.to_str())
        if (spec.get("decoder") or {}).get("type") != "ByteLevel":
            return None
        added = {t["id"]: t for t in spec.get("added_tokens", [])}
        out = [0] * self.vocab_size
        for token, i in self.inner.get_vocab(with_added_tokens=True).items():
            a = added.get(i)
            out[i] = len(token) if a is None else 0 if a["special"] else len(token.encode("utf-8"))
        return out

    # -- facts -----------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (max id + 1)."""
        return self._vocab_size

    @property
    def kind(self) -> str:
        """'bpe' | 'wordpiece' | 'unigram' | 'wordlevel', from the model section of tokenizer.json."""
        return self._kind

    @property
    def eos_ids(self) -> list[int]:
        """The ids that end a generated row: eos, then any a checkpoint names (`add_eos_ids`)."""
        first = [self.eos_id] if self.eos_id is not None else []
        return first + [i for i in self._extra_eos if i not in first]

    @property
    def stop_ids(self) -> list[int]:
        """The ids where generation ends: `eos_ids`, else [SEP] (WordPiece has no eos; [SEP] is the
        separator prepare writes after every document, so a GPT trained on those shards ends with it)."""
        return self.eos_ids or ([self.sep_id] if self.sep_id is not None else [])

    def add_eos_ids(self, ids: Iterable[int]) -> None:
        """More ids that end generation, e.g. an HF checkpoint's eos_token_id list (`api.load` adds them)."""
        self._extra_eos += [int(i) for i in ids if int(i) not in self._extra_eos]

    @property
    def separator_id(self) -> int:
        """The id written after every document in token shards: eos (BPE, Unigram) or [SEP] (WordPiece)."""
        sep = self.eos_id if self.eos_id is not None else self.sep_id
        if sep is None:
            raise CheckpointError("tokenizer has neither an eos token nor [SEP]; retrain it with lmforge")
        return sep

    @property
    def hash(self) -> str:
        """sha256 of the canonical (sorted-key, compact) JSON, so formatting does not change it."""
        canon = json.dumps(json.loads(self.inner.to_str()), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canon.encode("utf-8")).hexdigest()

    def __repr__(self) -> str:
        return f"Tokenizer({self.kind}, vocab_size={self.vocab_size}, eos={self.eos_id}, sep={self.sep_id})"


# ---------------------------------------------------------------------------------------------
# training


def save_path(path: str | Path) -> Path:
    """Where `Tokenizer.save(path)` writes: path/tokenizer.json for a folder or a name without .json."""
    path = Path(path)
    return path / "tokenizer.json" if path.suffix != ".json" or path.is_dir() else path


def build(kind: str, lowercase: bool = True, extra_ids: int = 100) -> tuple[_HFTokenizer, list[str]]:
    """An untrained tokenizer of one family and the special tokens its trainer must reserve first."""
    if kind == "bpe":
        tok = _HFTokenizer(models.BPE())
        # use_regex=True is GPT-2's pre-tokenization pattern; prepare's tiktoken fast path relies on it
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
        return tok, list(BPE_SPECIALS)
    if kind == "wordpiece":
        tok = _HFTokenizer(models.WordPiece(unk_token="[UNK]", max_input_chars_per_word=100))
        # handle_chinese_chars puts spaces around CJK ideographs, so each becomes its own word
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=lowercase
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece(prefix="##")
        return tok, list(BERT_SPECIALS)
    if kind == "unigram":
        tok = _HFTokenizer(models.Unigram())
        tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Replace("\u00a0", " ")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        return tok, T5_SPECIALS + [f"<extra_id_{i}>" for i in range(extra_ids)]
    raise ConfigError(f"unknown tokenizer type {kind!r}; choose one of: {', '.join(TYPES)}")


def _post_processor(kind: str, tok: _HFTokenizer) -> None:
    """Templates that add specials when `add_special_tokens=True` (what transformers does by default)."""
    ids = lambda *names: [(n, tok.token_to_id(n)) for n in names]
    if kind == "wordpiece":
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=ids("[CLS]", "[SEP]")
        )
    elif kind == "unigram":
        tok.post_processor = processors.TemplateProcessing(
            single="$A </s>", pair="$A </s> $B:1 </s>:1", special_tokens=ids("</s>")
        )


def check_vocab_size(kind: str, vocab_size: int, extra_ids: int = 100) -> None:
    """Refuse, before any work, a vocab size that cannot hold the family's specials and alphabet."""
    if extra_ids < 0:
        raise ConfigError(f"--extra-ids must be >= 0 (the number of <extra_id_N> sentinels), got {extra_ids}")
    floor = len(build(kind, extra_ids=extra_ids)[1]) + (256 if kind == "bpe" else 1)
    if vocab_size <= floor:
        raise ConfigError(f"--vocab-size {vocab_size} is too small for {kind}; use more than {floor}")


def train(
    kind: str,
    texts: Iterable[str],
    vocab_size: int,
    *,
    lowercase: bool = True,
    extra_ids: int = 100,
    min_frequency: int = 2,
    show_progress: bool = False,
) -> Tokenizer:
    """Train a tokenizer of family `kind` on an iterable of documents (streamed; the same data gives the
    same tokenizer: a one-shot iterator is spooled to a temporary file for WordPiece's second pass).

    >>> tok = train("bpe", ["hello world"] * 50, vocab_size=270)
    >>> tok.decode(tok.encode("hello"))
    'hello'
    """
    check_vocab_size(kind, vocab_size, extra_ids)
    tok, specials = build(kind, lowercase=lowercase, extra_ids=extra_ids)
    added = [AddedToken(s, special=True, normalized=False) for s in specials]
    encoding = tok.pre_tokenizer
    tok.pre_tokenizer = capped(encoding, MAX_TRAIN_WORD)  # for training only: the file keeps `encoding`
    if kind == "wordpiece":
        tok = _train_wordpiece(tok, specials, texts, vocab_size, min_frequency, show_progress)
    else:
        if kind == "bpe":
            trainer = trainers.BpeTrainer(
                vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=added,
                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress,
            )
        else:
            trainer = trainers.UnigramTrainer(
                vocab_size=vocab_size, special_tokens=added, unk_token="<unk>", show_progress=show_progress,
            )
        try:
            tok.train_from_iterator(_batches(texts), trainer=trainer)
        except Exception as e:  # the Rust trainer's own words, as a plain Exception
            if "not large enough to contain all chars" not in str(e):
                raise
            raise ConfigError(f"--vocab-size {vocab_size} is too small for {kind} on this text: the vocab "
                              "must hold every character it uses; raise --vocab-size") from None
    tok.pre_tokenizer = encoding
    _post_processor(kind, tok)
    # hand back what tokenizer.json will hold: a freshly trained Unigram can segment a few strings
    # differently from the same model read back from its JSON (seen ~1 in 20 trainings)
    return Tokenizer(_HFTokenizer.from_str(tok.to_str()))


def capped(pre: pre_tokenizers.PreTokenizer, cap: int) -> pre_tokenizers.PreTokenizer:
    """`pre`, then every word longer than `cap` characters cut into pieces of `cap` (the last shorter).

    For training: a whitespace-free run (a CJK line without punctuation, a base64 blob) is one word, and
    the trainers' cost grows with the longest word (Unigram crashes). Shorter words are left whole.

    >>> capped(pre_tokenizers.Metaspace(), cap=4).pre_tokenize_str("ab abcdefghij")
    [('▁ab', (0, 2)), ('▁abc', (2, 6)), ('defg', (6, 10)), ('hij', (10, 13))]
    """
    return pre_tokenizers.Sequence([pre, pre_tokenizers.Split(Regex(rf"[\s\S]{{1,{cap}}}"), "isolated")])


def _train_wordpiece(tok: _HFTokenizer, specials: list[str], texts: Iterable[str], vocab_size: int,
                     min_frequency: int, show_progress: bool) -> _HFTokenizer:
    """WordPiece, reproducibly: two passes over the documents.

    `tokenizers` numbers the "##x" continuation pieces in hash-map order, and ids break ties
    between equally frequent merges, so a single pass gives a slightly different vocab from run
    to run (huggingface/tokenizers#1794). Pass 1 only counts words (vocab_size=1: no merges) to
    learn which ##x pieces exist; pass 2 reserves them, sorted, right after the specials, so every
    id is fixed before the first merge, then turns them back into ordinary vocab entries.
    A one-shot iterator is spooled to a temporary file during pass 1 (disk, not memory).
    """
    def trainer(size: int, reserved: list[str]) -> trainers.WordPieceTrainer:
        return trainers.WordPieceTrainer(
            vocab_size=size, min_frequency=min_frequency, continuing_subword_prefix="##",
            special_tokens=[AddedToken(s, special=True, normalized=False) for s in reserved],
            show_progress=show_progress,
        )

    with tempfile.TemporaryDirectory(prefix="lmforge-wp-") as tmp:
        spool = None if isinstance(texts, (list, tuple)) else Path(tmp) / "docs.jsonl"
        probe = _HFTokenizer.from_str(tok.to_str())
        probe.train_from_iterator(_batches(texts if spool is None else _spooled(texts, spool)),
                                  trainer=trainer(1, specials))
        pieces = sorted(t for t in probe.get_vocab() if t.startswith("##"))
        again = texts if spool is None else (json.loads(line) for line in spool.open(encoding="utf-8"))
        tok.train_from_iterator(_batches(again), trainer=trainer(vocab_size, specials + pieces))
    if tok.get_vocab_size() > vocab_size:  # the alphabet and its ##x pieces are kept whatever the size
        chars = probe.get_vocab_size() - len(specials) - len(pieces)
        print(f"note: the wordpiece vocab has {tok.get_vocab_size():,} tokens, more than --vocab-size "
              f"{vocab_size:,}: it always holds every character of the text ({chars:,}), their ##x "
              f"continuation pieces ({len(pieces):,}) and the {len(specials)} specials; a larger "
              "--vocab-size leaves room for merged pieces", file=sys.stderr)
    spec = json.loads(tok.to_str())
    reserved = set(pieces)
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["content"] not in reserved]
    return _HFTokenizer.from_str(json.dumps(spec))


def _spooled(texts: Iterable[str], path: Path) -> Iterator[str]:
    """Yield `texts` while writing them to `path`, one JSON string per line, to be read again."""
    with path.open("w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps(t) + "\n")
            yield t


def _batches(texts: Iterable[str], size: int = 256) -> Iterator[list[str]]:
    """Lists of documents for `train_from_iterator` (it takes batches as well as single strings)."""
    batch: list[str] = []
    for t in texts:
        batch.append(t)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
