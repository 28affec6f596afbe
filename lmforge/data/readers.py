"""Users' own data, everywhere a source is accepted: files, globs, folders, named sources -> documents.

    >>> stats = ReadStats()
    >>> docs = list(iter_documents("corpus/", stats=stats))      # every supported file, recursively
    >>> stats                                                    # counted while reading
    ReadStats(documents=120, bytes=5123456, replaced_bytes=0, files=3)

A spec is, in this order: an existing file or folder (folders are walked recursively, skipping
hidden entries and lmforge's outputs: run dirs, model, tokenizer and shard folders), a glob
(`data/**/*.jsonl`), or a named source from `lmforge data list`, which is fetched once and read
from the cache. Formats by extension (add `.gz` to any but Parquet):

- `.txt`, `.md`: one document per file. Files over 32 MB (of text: a .gz counts decompressed) are
  cut at blank lines into documents of about 1 MB (at a line end if no blank line comes for 8 MB),
  so no file is ever held whole.
- `.jsonl`, `.json`: one JSON object per line, text in `text_field`; a line may also be a bare JSON
  string. A `.json` file that starts with `[` is a JSON array, loaded whole: keep big data in JSONL.
- `.csv`: a header row; the text is column `text_field`, or the only non-numeric column.
- `.parquet`: column `text_field` (or the only string column), streamed in record batches.

Bytes that are not valid UTF-8 become U+FFFD and are counted in `ReadStats.replaced_bytes`:
never a crash. Empty / whitespace-only documents are skipped. `iter_labeled` yields
(text, label) pairs from JSONL / CSV / Parquet for classification fine-tuning.
"""

from __future__ import annotations

import codecs
import csv
import glob
import gzip
import io
import json
import os
import zlib
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from lmforge.errors import DataError

TEXT_EXTS = (".txt", ".md")
RECORD_EXTS = (".jsonl", ".json", ".csv", ".parquet")
SPLIT_BYTES = 32 * 2**20  # text files above this are cut into several documents
CHUNK_BYTES = 2**20  # ... of about this size, at a blank line
HARD_CHUNK_BYTES = 8 * 2**20  # ... or at a line end, if no blank line comes
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")  # beside config.json: a model folder, never data


@dataclass
class ReadStats:
    """What a read saw; pass one in and it is filled while the iterator runs."""

    documents: int = 0
    bytes: int = 0  # UTF-8 size of the documents yielded
    replaced_bytes: int = 0  # input bytes that were not valid UTF-8 (each became U+FFFD)
    files: int = 0


# A codec error handler that counts what it replaces. The counter is module-level because codecs
# handlers are global; readers take differences around each decode, so this stays exact per file.
_REPLACED = [0]


def _count_and_replace(err: UnicodeDecodeError) -> tuple[str, int]:
    _REPLACED[0] += err.end - err.start
    return "\ufffd", err.end


codecs.register_error("lmforge-count", _count_and_replace)


def decode(data: bytes, stats: ReadStats | None = None) -> str:
    """UTF-8 bytes -> str, never failing; bad bytes become U+FFFD and are counted.

    >>> s = ReadStats(); decode(b"caf\\xe9!", s), s.replaced_bytes
    ('caf\\ufffd!', 1)
    """
    before = _REPLACED[0]
    text = data.decode("utf-8", errors="lmforge-count")
    if stats is not None:
        stats.replaced_bytes += _REPLACED[0] - before
    return text


# ---------------------------------------------------------------------------------------------
# resolving a spec to files


def file_kind(path: Path) -> str:
    """'.txt' for notes.txt, '.jsonl' for x.jsonl.gz, '' when unsupported."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    ext = suffixes[-1] if suffixes else ""
    if ext == ".parquet" and path.suffix.lower() == ".gz":
        return ""
    return ext if ext in TEXT_EXTS + RECORD_EXTS else ""


def resolve(spec: str | Path) -> list[Path]:
    """The files a spec names, sorted; named sources resolve to their cached docs.jsonl."""
    spec = str(spec)
    path = Path(spec).expanduser()
    supported = ", ".join(TEXT_EXTS + RECORD_EXTS)
    if path.is_file():
        if not file_kind(path):
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {supported} (or .gz)")
        return [path]
    if path.is_dir():
        if what := lmforge_output(path):
            raise DataError(f"folder {path} is {what} that lmforge wrote, not data; "
                            "give the folder of your documents (keep lmforge's outputs out of it)")
        files = sorted(_folder_files(path))
        if not files:
            raise DataError(f"folder {path} holds no {supported} files")
        return files
    if any(c in spec for c in "*?["):
        pattern = os.path.expanduser(spec)  # "~/data/*.txt" quoted: the shell did not expand the ~
        files = sorted(Path(p) for p in glob.glob(pattern, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"glob {spec!r} matches no files; check the pattern (quote it in the shell)")
        bad = [p for p in files if not file_kind(p)]
        if bad:
            raise DataError(f"{bad[0]}: unsupported file type; narrow the glob to {supported} files")
        return files
    from lmforge.data import sources

    if spec in sources.SOURCES:
        return [sources.ensure(spec)]
    names = ", ".join(sources.SOURCES)
    raise DataError(f"{spec}: no such file, folder or named source; named sources: {names}")


def _folder_files(root: Path) -> Iterator[Path]:
    """Supported files under `root`, leaving out hidden entries and lmforge's own outputs kept there
    (see lmforge_output), so `--data data/` still reads only the data after `prepare --out data/shards`."""
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if not d.startswith(".") and not lmforge_output(Path(folder, d))]
        for name in names:
            if not name.startswith(".") and file_kind(Path(folder, name)):
                yield Path(folder, name)


def lmforge_output(folder: Path) -> str:
    """What lmforge wrote `folder` as ('a run dir (run.yaml)', ...), or '' for a folder of data."""
    if (folder / "run.yaml").is_file():
        return "a run dir (run.yaml)"
    if (folder / "config.json").is_file() and any((folder / w).is_file() for w in WEIGHT_FILES):
        return "a model folder (config.json + weights)"
    if (folder / "tokenizer.json").is_file():  # `tokenizer train --out`, and every shard folder
        return "a tokenizer or shard folder (tokenizer.json)"
    return ""


def _open(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else open(path, "rb")


GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)  # not gzip; cut short; corrupt inside


def gzip_error(path: Path, e: Exception) -> DataError:
    """The one-line error for a .gz file that does not decompress (raised while reading, at any point)."""
    return DataError(f"{path}: not a valid gzip file ({str(e) or e.__class__.__name__}); "
                     "re-download it or gunzip it")


# ---------------------------------------------------------------------------------------------
# one reader per format; each yields (text, label or None)


def _read_text(path: Path, stats: ReadStats) -> Iterator[str]:
    with _open(path) as f:
        lines = iter(lambda: f.readline(HARD_CHUNK_BYTES), b"")
        if path.suffix.lower() != ".gz":
            if path.stat().st_size <= SPLIT_BYTES:
                yield decode(f.read(), stats).removeprefix("\ufeff")
            else:
                yield from _cut(lines, stats)
            return
        # compressed: the size is known only once read; hold up to SPLIT_BYTES, then cut as above
        head: deque[bytes] = deque()
        size = 0
        for line in lines:
            head.append(line)
            size += len(line)
            if size > SPLIT_BYTES:
                yield from _cut(_drain(head, lines), stats)
                return
        yield decode(b"".join(head), stats).removeprefix("\ufeff")


def _drain(head: deque[bytes], rest: Iterator[bytes]) -> Iterator[bytes]:
    """The lines of `head` (freed as they go), then the rest."""
    while head:
        yield head.popleft()
    yield from rest


def _cut(lines: Iterator[bytes], stats: ReadStats) -> Iterator[str]:
    """A big text's lines -> documents, cut at a blank line past CHUNK_BYTES (at HARD_CHUNK_BYTES if none)."""
    dec = codecs.getincrementaldecoder("utf-8-sig")(errors="lmforge-count")
    parts: list[str] = []
    size = 0
    for line in lines:
        before = _REPLACED[0]
        parts.append(dec.decode(line))
        stats.replaced_bytes += _REPLACED[0] - before
        size += len(line)
        blank = not line.strip()
        if (blank and size >= CHUNK_BYTES) or size >= HARD_CHUNK_BYTES:
            yield "".join(parts)
            parts, size = [], 0
    before = _REPLACED[0]
    parts.append(dec.decode(b"", final=True))
    stats.replaced_bytes += _REPLACED[0] - before
    yield "".join(parts)


def _field_error(where: str, field: str, keys: list[str], how: str) -> DataError:
    """how: the fix, '--text-field NAME' (a CLI flag) or 'label_field=NAME' (iter_labeled is Python only)."""
    return DataError(f"{where}: no field {field!r} (fields: {', '.join(keys) or 'none'}); "
                     f"pass {how} to pick one")


def _read_jsonl(path: Path, text_field: str, label_field: str | None, stats: ReadStats) -> Iterator[tuple]:
    with _open(path) as f:
        head = f.read(64).lstrip(b"\xef\xbb\xbf \t\r\n")
    if file_kind(path) == ".json" and head.startswith(b"["):
        with _open(path) as f:
            try:
                rows = json.loads(decode(f.read(), stats).removeprefix("\ufeff"))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg}); fix the file") from None
        for i, obj in enumerate(rows):
            yield _pick(obj, text_field, label_field, f"{path}[{i}]")
        return
    with _open(path) as f:
        for lineno, raw in enumerate(f, 1):
            line = decode(raw, stats).strip().removeprefix("\ufeff")
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                if line.startswith("{") and e.pos == len(line):  # pretty-printed: the object goes on
                    raise DataError(f"{path}:{lineno}: a JSON object that does not end on its line; a "
                                    ".jsonl / .json data file holds one JSON object per line (JSON lines), "
                                    "or (.json only) one JSON array of them") from None
                raise DataError(f"{path}:{lineno}: not valid JSON ({e.msg}); "
                                "each line must be one JSON object") from None
            yield _pick(obj, text_field, label_field, f"{path}:{lineno}")


def _pick(obj, text_field: str, label_field: str | None, where: str) -> tuple:
    if isinstance(obj, str) and label_field is None:
        return obj, None
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object with {text_field!r}, got {type(obj).__name__}")
    if text_field not in obj:
        raise _field_error(where, text_field, list(obj), "--text-field NAME")
    text = obj[text_field]
    if text is not None and not isinstance(text, str):
        raise DataError(f"{where}: field {text_field!r} is {type(text).__name__}, not a string; "
                        "pass --text-field NAME for the text field")
    if label_field is None:
        return text or "", None
    if label_field not in obj or obj[label_field] is None:
        raise _field_error(where, label_field, list(obj), "label_field=NAME")
    return text or "", str(obj[label_field])


def _numeric(value: str) -> bool:
    try:
        float(value)
        return True
    except ValueError:
        return value.strip() == ""


def _read_csv(path: Path, text_field: str, label_field: str | None, stats: ReadStats) -> Iterator[tuple]:
    csv.field_size_limit(2**31 - 1)
    with _open(path) as raw, io.TextIOWrapper(raw, encoding="utf-8-sig", errors="lmforge-count",
                                              newline="") as f:
        reader = _counting(csv.reader(f), stats)
        header = next(reader, None)
        if not header:
            return
        peek = [row for _, row in zip(range(100), reader)]
        col = _csv_column(path, header, peek, text_field)
        lab = None
        if label_field is not None:
            if label_field not in header:
                raise _field_error(f"{path}", label_field, header, "label_field=NAME")
            lab = header.index(label_field)
        rows = iter(peek)
        for lineno, row in enumerate(_chain(rows, reader), 2):
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{lineno}: {len(row)} fields where the header has {len(header)}; "
                                "quote fields that contain commas")
            yield row[col], (row[lab] if lab is not None else None)


def _counting(rows: Iterator[list[str]], stats: ReadStats) -> Iterator[list[str]]:
    """Rows of a reader whose decoding may replace bytes; count them around each (synchronous) fetch."""
    while True:
        before = _REPLACED[0]
        row = next(rows, None)
        stats.replaced_bytes += _REPLACED[0] - before
        if row is None:
            return
        yield row


def _chain(first, rest):
    yield from first
    yield from rest


def _csv_column(path: Path, header: list[str], rows: list[list[str]], text_field: str) -> int:
    if text_field in header:
        return header.index(text_field)
    texty = [i for i in range(len(header)) if any(not _numeric(r[i]) for r in rows if i < len(r))]
    if len(texty) == 1:
        return texty[0]
    raise _field_error(str(path), text_field, header, "--text-field NAME")


def _read_parquet(path: Path, text_field: str, label_field: str | None, stats: ReadStats) -> Iterator[tuple]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("reading .parquet needs pyarrow: pip install 'lmforge[data]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(f"{path}: not a readable Parquet file ({e.__class__.__name__}); check it") from None
    schema = pf.schema_arrow
    names = list(schema.names)
    col = text_field
    if col not in names:
        strings = [f.name for f in schema if str(f.type) in ("string", "large_string", "binary")]
        if len(strings) != 1:
            raise _field_error(str(path), text_field, names, "--text-field NAME")
        col = strings[0]
    kind = schema.field(col).type
    while pa.types.is_dictionary(kind):  # a categorical column of strings reads as strings
        kind = kind.value_type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_binary(kind)
            or pa.types.is_large_binary(kind)):
        raise DataError(f"{path}: field {col!r} is {kind}, not a string; pass --text-field NAME")
    cols = [col]
    if label_field is not None:
        if label_field not in names:
            raise _field_error(str(path), label_field, names, "label_field=NAME")
        cols.append(label_field)
    for batch in pf.iter_batches(batch_size=1024, columns=cols):
        texts = batch.column(0).to_pylist()
        labels = batch.column(1).to_pylist() if label_field is not None else [None] * len(texts)
        for text, label in zip(texts, labels):
            if isinstance(text, bytes):
                text = decode(text, stats)
            yield text or "", (None if label is None else str(label))


# ---------------------------------------------------------------------------------------------
# public iterators


def _records(spec, text_field: str, label_field: str | None, stats: ReadStats) -> Iterator[tuple]:
    for path in resolve(spec):
        stats.files += 1
        try:
            yield from _read_file(path, text_field, label_field, stats)
        except GZIP_ERRORS as e:  # a .gz fails where it is read, so possibly after documents went out
            if path.suffix.lower() != ".gz":
                raise
            raise gzip_error(path, e) from None


def _read_file(path: Path, text_field: str, label_field: str | None, stats: ReadStats) -> Iterator[tuple]:
    kind = file_kind(path)
    if kind in TEXT_EXTS:
        if label_field is not None:
            raise DataError(f"{path}: labeled data must be .jsonl, .csv or .parquet (text + label)")
        yield from ((t, None) for t in _read_text(path, stats))
    elif kind in (".jsonl", ".json"):
        yield from _read_jsonl(path, text_field, label_field, stats)
    elif kind == ".csv":
        yield from _read_csv(path, text_field, label_field, stats)
    else:
        yield from _read_parquet(path, text_field, label_field, stats)


def _counted(spec, text_field: str, label_field: str | None, stats: ReadStats | None) -> Iterator[tuple]:
    stats = stats if stats is not None else ReadStats()
    start = stats.documents  # a shared ReadStats may already count other specs' documents
    for text, label in _records(spec, text_field, label_field, stats):
        if not text.strip():
            continue
        stats.documents += 1
        stats.bytes += len(text.encode("utf-8"))
        yield text, label
    if stats.documents == start:
        raise DataError(f"{spec}: no non-empty documents; check the path and --text-field")


def iter_documents(spec: str | Path, *, text_field: str = "text",
                   stats: ReadStats | None = None) -> Iterator[str]:
    """Stream the documents (str) a spec names: a named source, file, glob or folder.

    >>> list(iter_documents("notes.txt"))          # notes.txt holds "hello\\n"
    ['hello\\n']
    """
    for text, _ in _counted(spec, text_field, None, stats):
        yield text


def iter_labeled(spec: str | Path, text_field: str = "text", label_field: str = "label",
                 stats: ReadStats | None = None) -> Iterator[tuple[str, str]]:
    """Stream (text, label) pairs from labeled JSONL / CSV / Parquet (labels as strings).

    >>> list(iter_labeled("reviews.csv"))         # header text,label; one row: great film,pos
    [('great film', 'pos')]
    """
    yield from _counted(spec, text_field, label_field, stats)
