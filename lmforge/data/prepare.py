"""`lmforge prepare`: documents -> token shards + meta.json, multi-process, streaming, atomic.

    $ lmforge prepare --data shakespeare --tokenizer tok/ --out shards/ --workers 2

Output (the folder appears only when complete; meta.json is the completion mark):

    OUT/meta.json               dtype, vocab_size, tokenizer_hash, eos_id, separator_id, splits, sources
    OUT/tokenizer.json          copy of the tokenizer used
    OUT/train/shard-00000.bin   raw little-endian uint16 (vocab <= 65,536) or uint32 token ids;
                                every document is followed by separator_id (eos, or [SEP] for WordPiece)
    OUT/train/docs.npy          int64 start offset of each document in the split's concatenated stream
    OUT/val/...

Documents are numbered in reading order from 0; document i >= 1 goes to val when
ceil(i*f) > ceil((i-1)*f) for `--val-fraction f` (documents 1, 1+1/f, 1+2/f, ...: evenly spread, at
least one once there are two documents, never document 0), or when i < N for `--val-docs N`.
The split depends only on the order of the input, never on worker count, so a re-run gives
byte-identical files.

Speed: byte-level BPE tokenizers are encoded with `tiktoken`, 2-4x the speed of `tokenizers`, once
checked id-for-id against `tokenizers` (fastencode.py: the fast path and its guard).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import time
from collections import deque
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from lmforge.data.fastencode import GUARD_CHARS, Encoder, check_fast_path, fast_encoding
from lmforge.errors import CheckpointError, ConfigError, DataError, is_count
from lmforge.io import atomic_dir, atomic_write_json
from lmforge.tokenizer import Tokenizer

VERSION = 1
SHARD_NAME = re.compile(r"shard-\d{5,}\.bin")  # SplitWriter's file names, inside train/ and val/
BATCH_CHARS = 1 << 20  # documents are sent to workers in batches of about this many characters

# ---------------------------------------------------------------------------------------------
# workers

_WORKER: dict = {}


def _init_worker(tok_json: str, backend: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one thread per worker process
    _WORKER["enc"] = Encoder(tok_json, backend)


def _encode_in_worker(docs: list[str], dtype: str) -> tuple[np.ndarray, np.ndarray]:
    ids, lengths = _WORKER["enc"].encode(docs)
    return ids.astype(dtype), lengths


# ---------------------------------------------------------------------------------------------
# writing


class SplitWriter:
    """Appends id arrays to OUT/SPLIT/shard-NNNNN.bin files of at most `shard_tokens` ids each."""

    def __init__(self, root: Path, split: str, dtype: str, shard_tokens: int):
        self.root, self.split, self.dtype, self.shard_tokens = root, split, dtype, shard_tokens
        (root / split).mkdir(parents=True)
        self.tokens = 0
        self.shards: list[str] = []
        self.starts: list[np.ndarray] = []
        self._file = None
        self._room = 0

    def write(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        self.starts.append(self.tokens + np.concatenate(([0], np.cumsum(lengths)[:-1])))
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._room == 0:
                self._open_next()
            take = ids[: self._room]
            take.astype(take.dtype.newbyteorder("<"), copy=False).tofile(self._file)
            self._room -= len(take)
            self.tokens += len(take)
            ids = ids[len(take):]

    def _open_next(self) -> None:
        if self._file:
            self._file.close()
        name = f"{self.split}/shard-{len(self.shards):05d}.bin"
        self.shards.append(name)
        self._file = open(self.root / name, "wb")  # noqa: SIM115 (closed in close / _open_next)
        self._room = self.shard_tokens

    def close(self) -> dict:
        if self._file:
            self._file.close()
        starts = np.concatenate(self.starts) if self.starts else np.zeros(0, dtype=np.int64)
        np.save(self.root / self.split / "docs.npy", starts.astype(np.int64))
        return {"tokens": self.tokens, "documents": len(starts), "shards": self.shards}


def val_mask(first: int, n: int, val_fraction: float, val_docs: int | None) -> np.ndarray:
    """Which of documents first..first+n-1 go to val.

    >>> val_mask(0, 6, 0.5, None).tolist()      # i >= 1 and ceil(i*f) > ceil((i-1)*f)
    [False, True, False, True, False, True]
    >>> val_mask(0, 4, 0.0, 2).tolist()         # --val-docs: the first N documents
    [True, True, False, False]
    """
    i = np.arange(first, first + n, dtype=np.float64)
    if val_docs is not None:
        return i < val_docs
    return (i >= 1) & (np.ceil(i * val_fraction) > np.ceil((i - 1) * val_fraction))


def split_lone_document(docs: Iterable[str], pieces: int = 64, seen: dict | None = None) -> Iterator[str]:
    """Pass documents through; if the whole input is ONE document, cut it into ~`pieces` documents
    at blank lines (else line ends, else spaces, else anywhere: the first that cuts it at all, so a
    file of one long line is cut too; whitespace-only pieces dropped) so a single text file still
    gets a val split. `seen["split"]` is set True when that happened.

    >>> list(split_lone_document(["a\\n\\nbb\\n\\nc"], pieces=8))
    ['a\\n\\n', 'bb\\n\\n', 'c']
    >>> list(split_lone_document(["one long line, no newline"], pieces=4))
    ['one long ', 'line, no ', 'newline']
    """
    it = iter(docs)
    first = next(it, None)
    if first is None:
        return
    second = next(it, None)
    if second is not None:
        yield first
        yield second
        yield from it
        return
    target = max(1, len(first) // pieces)
    if seen is not None:
        seen["split"] = True
    for sep in ("\n\n", "\r\n\r\n", "\n", " ", ""):  # "" cuts anywhere: a line of CJK text has no spaces
        out = _cut_at(first, sep, target)
        if len(out) > 1 or not sep:
            yield from out
            return


def _cut_at(text: str, sep: str, target: int) -> list[str]:
    """`text` in pieces of at least `target` characters, each ending at the next `sep` (the last at
    the end); whitespace-only pieces dropped."""
    out, start = [], 0
    while start < len(text):
        cut = text.find(sep, start + target)
        end = len(text) if cut < 0 else cut + len(sep)
        if text[start:end].strip():
            out.append(text[start:end])
        start = end
    return out


def batches(docs: Iterable[str], batch_chars: int | None = None) -> Iterator[list[str]]:
    """Group documents into lists of about `batch_chars` characters (empty documents dropped)."""
    batch_chars = batch_chars or BATCH_CHARS
    batch, size = [], 0
    for d in docs:
        if not d:
            continue
        batch.append(d)
        size += len(d)
        if size >= batch_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ---------------------------------------------------------------------------------------------
# the whole run


def prepare(
    sources: list[str],
    tokenizer: str | Path,
    out: str | Path,
    *,
    val_fraction: float = 0.01,
    val_docs: int | None = None,
    workers: int = 1,
    text_field: str = "text",
    shard_tokens: int = 100_000_000,
    dtype: str = "auto",
    encoder: str = "auto",
    progress: bool = True,
    documents: Iterable[str] | None = None,
) -> dict:
    """Tokenize `sources` into shards under `out`; return meta (also written to out/meta.json).

    `documents` replaces reading `sources` (tests, callers with text in memory); `encoder` is
    auto | tiktoken | tokenizers.
    """
    from tqdm import tqdm

    if not 0 <= val_fraction < 1:
        raise ConfigError(f"--val-fraction {val_fraction} must be in [0, 1)")
    for flag, value, least in (("--workers", workers, 1), ("--shard-tokens", shard_tokens, 1),
                               ("--val-docs", val_docs, 0)):
        if value is not None and value < least:
            raise ConfigError(f"{flag} must be >= {least}, got {value}")
    tok = Tokenizer.load(tokenizer)
    dtype = _pick_dtype(dtype, tok.vocab_size)
    out = Path(out)
    if why := _not_replaceable(out):
        raise DataError(f"{out} exists and is not a shard folder ({why}); choose an empty or new --out")

    read_stats = None
    if documents is None:
        from lmforge.data.readers import ReadStats, iter_documents

        read_stats = ReadStats()
        documents = (d for s in sources for d in iter_documents(s, text_field=text_field, stats=read_stats))
    else:  # blank documents are dropped as the file readers drop them, before a lone document is cut
        documents = (d for d in documents if d and not d.isspace())
    lone: dict = {}
    # --val-docs N replaces --val-fraction (whose default the CLI still passes): N = 0 asks for no val
    wants_val = val_docs > 0 if val_docs is not None else val_fraction > 0
    stream = batches(split_lone_document(documents, seen=lone) if wants_val else documents)
    first = next(stream, None)
    if first is None:
        where = ", ".join(sources) or "the input"
        raise DataError(f"no documents in {where}; check the path and --text-field")

    backend, note = _pick_backend(tok, encoder, first)
    if note:
        print(f"note: {note}")
    t0 = time.time()
    nbytes = 0
    with atomic_dir(out) as tmp:
        writers = {s: SplitWriter(tmp, s, dtype, shard_tokens) for s in ("train", "val")}
        bar = tqdm(unit="B", unit_scale=True, desc="prepare", disable=None if progress else True)
        n_docs = 0

        def consume(docs: list[str], ids: np.ndarray, lengths: np.ndarray) -> None:
            nonlocal n_docs, nbytes
            is_val = val_mask(n_docs, len(docs), val_fraction, val_docs)
            n_docs += len(docs)
            size = sum(len(d.encode("utf-8")) for d in docs)
            nbytes += size
            bar.update(size)
            if not is_val.any():
                return writers["train"].write(ids, lengths)
            ends = np.cumsum(lengths)
            cuts = np.flatnonzero(np.diff(is_val)) + 1  # write runs of consecutive same-split documents
            for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(docs)]):
                a, b = (ends[lo - 1] if lo else 0), ends[hi - 1]
                writers["val" if is_val[lo] else "train"].write(ids[a:b], lengths[lo:hi])

        all_batches = _chain([first], stream)
        if workers == 1:
            enc = Encoder(tok.inner.to_str(), backend)
            for docs in all_batches:
                consume(docs, *enc.encode(docs))
        else:
            ctx = mp.get_context("spawn")
            with ctx.Pool(workers, _init_worker, (tok.inner.to_str(), backend)) as pool:
                pending: deque = deque()
                for docs in all_batches:  # at most 2 batches per worker in flight: bounded memory
                    pending.append((docs, pool.apply_async(_encode_in_worker, (docs, dtype))))
                    while len(pending) > 2 * workers:
                        d, r = pending.popleft()
                        consume(d, *r.get())
                while pending:
                    d, r = pending.popleft()
                    consume(d, *r.get())
        bar.close()
        splits = {s: w.close() for s, w in writers.items()}
        if splits["train"]["documents"] == 0:
            raise DataError(
                f"all {n_docs} document(s) went to val; add documents or lower --val-fraction / --val-docs"
            )
        if splits["val"]["documents"] == 0 and wants_val:
            print("note: the val split is empty; evaluation needs more documents or a larger --val-fraction")
        shutil.copyfile(tokenizer if Path(tokenizer).is_file() else Path(tokenizer) / "tokenizer.json",
                        tmp / "tokenizer.json")
        replaced = {k: v for k, v in vars(read_stats).items()} if read_stats is not None else {}
        meta = {
            "version": VERSION, "dtype": dtype, "vocab_size": tok.vocab_size, "tokenizer_hash": tok.hash,
            "tokenizer_kind": tok.kind, "eos_id": tok.eos_id, "separator_id": tok.separator_id,
            "splits": splits, "sources": list(sources), "text_field": text_field,
            "val": {"docs": val_docs} if val_docs is not None else {"fraction": val_fraction},
            "bytes": nbytes, "read_stats": replaced, "split_lone_document": bool(lone.get("split")),
        }
        atomic_write_json(tmp / "meta.json", meta)  # written last: the completion mark
    seconds = time.time() - t0
    _summary(out, meta, backend, workers, seconds)
    return meta


def _not_replaceable(out: Path) -> str:
    """Why `--out` must not be replaced, or '' when it is new, empty, or a shard folder holding only
    what prepare writes (a valid meta.json, tokenizer.json, train/ and val/ of shards and docs.npy)."""
    if not out.exists():
        return ""
    if not out.is_dir():
        return "it is a file"
    if not any(out.iterdir()):
        return ""
    for entry in sorted(out.iterdir()):
        if entry.name in ("meta.json", "tokenizer.json") and entry.is_file():
            continue
        if entry.name not in ("train", "val") or not entry.is_dir():
            return f"it holds {entry.name}"
        for f in sorted(entry.iterdir()):
            if not (f.is_file() and (f.name == "docs.npy" or SHARD_NAME.fullmatch(f.name))):
                return f"it holds {entry.name}/{f.name}"
    try:
        load_meta(out)
    except CheckpointError:
        return "its meta.json is missing or not one lmforge wrote"
    return ""


def _chain(*its: Iterable) -> Iterator:
    for it in its:
        yield from it


def _pick_dtype(dtype: str, vocab_size: int) -> str:
    if dtype == "auto":
        return "uint16" if vocab_size <= 2**16 else "uint32"  # ids 0 .. 65535
    if dtype not in ("uint16", "uint32"):
        raise ConfigError(f"--dtype {dtype} is not valid; choose auto, uint16 or uint32")
    if dtype == "uint16" and vocab_size > 2**16:
        raise ConfigError(f"vocab size {vocab_size:,} does not fit uint16; use --dtype uint32 (or auto)")
    return dtype


def _pick_backend(tok: Tokenizer, encoder: str, sample: list[str]) -> tuple[str, str | None]:
    """'tiktoken' when it is possible and verified identical on `sample`, else 'tokenizers' (+ a note)."""
    if encoder not in ("auto", "tiktoken", "tokenizers"):
        raise ConfigError(f"--encoder {encoder} is not valid; choose auto, tiktoken or tokenizers")
    if encoder == "tokenizers" or (encoder == "auto" and tok.kind != "bpe"):
        return "tokenizers", None
    enc, reason = fast_encoding(tok)
    if enc is None:
        if encoder == "tiktoken":
            raise ConfigError(f"--encoder tiktoken is not possible for this tokenizer: {reason}")
        return "tokenizers", f"fast path off ({reason}); using tokenizers"
    check, size = [], 0
    for d in sample:  # the first documents, cut at GUARD_CHARS (a 100 kB document is checked whole)
        check.append(d[: GUARD_CHARS - size])
        size += len(check[-1])
        if size >= GUARD_CHARS:
            break
    diff = check_fast_path(tok, check)
    if diff:
        if encoder == "tiktoken":
            raise ConfigError(f"--encoder tiktoken would change the shards: tiktoken and tokenizers disagree "
                              f"({diff}); use --encoder auto or tokenizers")
        return "tokenizers", f"fast path off: tiktoken and tokenizers disagree ({diff}); using tokenizers"
    return "tiktoken", None


def _summary(out: Path, meta: dict, backend: str, workers: int, seconds: float) -> None:
    mb = meta["bytes"] / 1e6
    tr, va = meta["splits"]["train"], meta["splits"]["val"]
    print(
        f"wrote {out}: train {tr['tokens']:,} tokens / {tr['documents']:,} docs "
        f"/ {len(tr['shards'])} shard(s), "
        f"val {va['tokens']:,} tokens / {va['documents']:,} docs, {meta['dtype']}"
    )
    replaced = sum(v for k, v in meta["read_stats"].items() if "replace" in k and isinstance(v, int))
    print(f"read {mb:.1f} MB in {seconds:.1f}s = {mb / max(seconds, 1e-9):.1f} MB/s "
          f"({backend}, {workers} worker(s)); {replaced:,} invalid UTF-8 byte(s) replaced with U+FFFD")


def load_meta(shard_dir: str | Path) -> dict:
    """Read OUT/meta.json; a folder without one is incomplete (an interrupted prepare) or not shards."""
    path = Path(shard_dir) / "meta.json"
    if not path.is_file():
        raise CheckpointError(f"{shard_dir} has no meta.json; run `lmforge prepare` to (re)create it")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt (not JSON: {e.__class__.__name__}); "
                              "re-run `lmforge prepare`") from None
    if why := _meta_problem(meta):
        raise CheckpointError(f"{path} is corrupt ({why}); re-run `lmforge prepare`")
    return meta


def _meta_problem(meta) -> str:
    """What is wrong with a parsed meta.json in the fields the readers use, or ''."""
    if not isinstance(meta, dict):
        return f"a JSON {type(meta).__name__}, not an object"
    if meta.get("dtype") not in ("uint16", "uint32"):
        return f"dtype {meta.get('dtype')!r} is not uint16 or uint32"
    if not is_count(meta.get("vocab_size"), 1):
        return f"vocab_size {meta.get('vocab_size')!r} is not a positive integer"
    if not isinstance(meta.get("tokenizer_hash", ""), str):
        return "tokenizer_hash is not a string"
    if meta.get("separator_id") is not None and not is_count(meta["separator_id"]):
        return f"separator_id {meta['separator_id']!r} is not a token id"
    if not isinstance(meta.get("splits"), dict):
        return "no splits object"
    for split, info in meta["splits"].items():
        if not isinstance(info, dict) or not is_count(info.get("tokens")):
            return f"splits.{split}.tokens is not a count"
        shards = info.get("shards")
        if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
            return f"splits.{split}.shards is not a list of file names"
    return ""


# ---------------------------------------------------------------------------------------------
# CLI


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", action="append", required=True, metavar="SPEC",
                        help="named source, file, glob or folder (txt/jsonl/csv/parquet); repeatable")
    parser.add_argument("--tokenizer", required=True, help="tokenizer.json or a folder holding one")
    parser.add_argument("--out", required=True, help="output folder (appears only when complete)")
    g = parser.add_mutually_exclusive_group()
    g.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents for val, evenly spread (default 0.01)")
    g.add_argument("--val-docs", type=int, default=None, help="instead: the first N documents go to val")
    parser.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)),
                        help="encoder processes (default: number of CPU cores, at most 8)")
    parser.add_argument("--text-field", default="text", help="column / JSON key holding the text")
    parser.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    parser.add_argument("--dtype", default="auto", choices=("auto", "uint16", "uint32"),
                        help="token id type (auto: uint16 when the vocabulary fits)")
    parser.add_argument("--encoder", default="auto", choices=("auto", "tiktoken", "tokenizers"),
                        help="auto: tiktoken for byte-level BPE when verified identical, else tokenizers")
    parser.set_defaults(func=_cmd)


def _cmd(args: argparse.Namespace) -> int:
    prepare(
        args.data, args.tokenizer, args.out, val_fraction=args.val_fraction, val_docs=args.val_docs,
        workers=args.workers, text_field=args.text_field, shard_tokens=args.shard_tokens,
        dtype=args.dtype, encoder=args.encoder,
    )
    return 0
