"""Users' own data: every format, spec kind and error case of readers.py, on files written here."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pytest

from lmforge.data import readers, sources
from lmforge.data.readers import ReadStats, iter_documents, iter_labeled
from lmforge.errors import DataError


def write(path: Path, data: str | bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def read(spec, **kw) -> tuple[list[str], ReadStats]:
    stats = ReadStats()
    return list(iter_documents(spec, stats=stats, **kw)), stats


# ---------------------------------------------------------------------------------------------
# formats


def test_txt_and_md_one_document_per_file(tmp_path):
    write(tmp_path / "a.txt", "\ufeffFirst doc.\n\nStill first.\n")
    write(tmp_path / "b.md", "# Second\n")
    write(tmp_path / "empty.txt", "  \n\n")
    docs, stats = read(tmp_path)
    assert docs == ["First doc.\n\nStill first.\n", "# Second\n"]
    assert stats == ReadStats(documents=2, bytes=len("First doc.\n\nStill first.\n# Second\n"),
                              replaced_bytes=0, files=3)


def write_text(path: Path, data: str | bytes) -> Path:
    """`data` as is, or gzipped when the name ends in .gz: either must read the same."""
    data = data.encode() if isinstance(data, str) else data
    return write(path, gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize("name", ["big.txt", "big.txt.gz"])
def test_big_txt_is_cut_at_blank_lines(tmp_path, monkeypatch, name):
    monkeypatch.setattr(readers, "SPLIT_BYTES", 50)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 20)
    monkeypatch.setattr(readers, "HARD_CHUNK_BYTES", 60)
    paras = ["alpha beta gamma delta\n", "\n", "epsilon zeta\n", "eta theta iota kappa\n", "\n", "lambda\n"]
    write_text(tmp_path / name, "".join(paras))
    docs, _ = read(tmp_path / name)
    # chunk 1 ends at the first blank line after 20 bytes; no blank line falls past 20 bytes in
    # chunk 2 until its end, so it ends at the file's end
    assert docs == ["alpha beta gamma delta\n\n", "epsilon zeta\neta theta iota kappa\n\n", "lambda\n"]
    assert "".join(docs) == "".join(paras)  # nothing lost or repeated
    monkeypatch.setattr(readers, "SPLIT_BYTES", len("".join(paras)))  # not over: one document, .gz too
    assert read(tmp_path / name)[0] == ["".join(paras)]


@pytest.mark.parametrize("name", ["lines.txt", "lines.txt.gz"])
def test_big_txt_without_blank_lines_cut_at_line_ends(tmp_path, monkeypatch, name):
    monkeypatch.setattr(readers, "SPLIT_BYTES", 10)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 5)
    monkeypatch.setattr(readers, "HARD_CHUNK_BYTES", 12)
    write_text(tmp_path / name, "aaaa\nbbbb\ncccc\ndddd\n")
    docs, _ = read(tmp_path / name)
    assert docs == ["aaaa\nbbbb\ncccc\n", "dddd\n"]


def test_jsonl_text_field_and_bare_strings(tmp_path):
    write(tmp_path / "d.jsonl", '{"text": "one", "id": 1}\n\n"two"\n{"text": ""}\n{"text": null}\n')
    assert read(tmp_path / "d.jsonl")[0] == ["one", "two"]
    write(tmp_path / "e.jsonl", '{"body": "x y", "text": 3}\n')
    assert read(tmp_path / "e.jsonl", text_field="body")[0] == ["x y"]


def test_json_array_and_gz(tmp_path):
    write(tmp_path / "arr.json", json.dumps([{"text": "a"}, {"text": "b"}]))
    assert read(tmp_path / "arr.json")[0] == ["a", "b"]
    write(tmp_path / "lines.json", '{"text": "c"}\n{"text": "d"}\n')
    assert read(tmp_path / "lines.json")[0] == ["c", "d"]
    write(tmp_path / "z.jsonl.gz", gzip.compress(b'{"text": "zipped"}\n'))
    write(tmp_path / "z.txt.gz", gzip.compress(b"zipped text"))
    assert read(tmp_path / "z.jsonl.gz")[0] == ["zipped"]
    assert read(tmp_path / "z.txt.gz")[0] == ["zipped text"]


def test_csv_named_or_only_text_column(tmp_path):
    write(tmp_path / "a.csv", '\ufeffid,text,score\n1,"hello, world",0.5\n2,"multi\nline",1\n')
    assert read(tmp_path / "a.csv")[0] == ["hello, world", "multi\nline"]
    write(tmp_path / "b.csv", "id,review,stars\n1,great,5\n2,bad,1\n3,,2\n")
    assert read(tmp_path / "b.csv")[0] == ["great", "bad"]  # the only non-numeric column
    write(tmp_path / "c.csv", "title,body\nT,B\n")
    assert read(tmp_path / "c.csv", text_field="body")[0] == ["B"]


def test_parquet_by_batches(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    texts = [f"doc {i}" for i in range(2500)]
    table = pa.table({"id": list(range(2500)), "content": texts, "label": ["pos", "neg"] * 1250})
    pq.write_table(table, tmp_path / "d.parquet", row_group_size=1000)
    docs, stats = read(tmp_path / "d.parquet", text_field="content")  # 3 batches of 1024 rows
    assert docs == texts and stats.documents == 2500
    assert list(iter_labeled(tmp_path / "d.parquet", "content"))[:2] == [("doc 0", "pos"), ("doc 1", "neg")]


def test_parquet_only_string_column(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"n": [1, 2], "body": ["x", "y"]}), tmp_path / "p.parquet")
    assert read(tmp_path / "p.parquet")[0] == ["x", "y"]
    pq.write_table(pa.table({"a": ["x"], "b": ["y"]}), tmp_path / "two.parquet")
    with pytest.raises(DataError, match=r"no field 'text' \(fields: a, b\); pass --text-field"):
        read(tmp_path / "two.parquet")
    pq.write_table(pa.table({"text": [1, 2], "body": ["x", "y"]}), tmp_path / "int.parquet")
    with pytest.raises(DataError, match=r"field 'text' is int64, not a string; pass --text-field"):
        read(tmp_path / "int.parquet")
    cat = pa.table({"text": pa.array(["x", "y", "x"]).dictionary_encode()})  # a categorical column
    pq.write_table(cat, tmp_path / "cat.parquet")
    assert read(tmp_path / "cat.parquet")[0] == ["x", "y", "x"]


def test_every_spec_must_hold_documents_even_with_shared_stats(tmp_path):
    """prepare shares one ReadStats over all --data specs: an empty second one is still an error."""
    write(tmp_path / "a.txt", "some text")
    write(tmp_path / "empty.txt", " \n\n")
    stats = ReadStats()
    assert list(iter_documents(tmp_path / "a.txt", stats=stats)) == ["some text"]
    with pytest.raises(DataError, match="empty.txt: no non-empty documents"):
        list(iter_documents(tmp_path / "empty.txt", stats=stats))


def test_labeled_jsonl_and_csv(tmp_path):
    write(tmp_path / "l.jsonl", '{"text": "good", "label": 1}\n{"text": "bad", "label": "neg"}\n')
    assert list(iter_labeled(tmp_path / "l.jsonl")) == [("good", "1"), ("bad", "neg")]
    write(tmp_path / "l.csv", "sentence,y\nfine,pos\n")
    assert list(iter_labeled(tmp_path / "l.csv", "sentence", "y")) == [("fine", "pos")]
    # iter_labeled is Python only: the fix names its argument, not a CLI flag that does not exist
    with pytest.raises(DataError, match=r"l.jsonl:1: no field 'y' .*pass label_field=NAME to pick one"):
        list(iter_labeled(tmp_path / "l.jsonl", label_field="y"))
    with pytest.raises(DataError, match=r"l.csv: no field 'label' .*pass label_field=NAME to pick one"):
        list(iter_labeled(tmp_path / "l.csv", "sentence"))
    with pytest.raises(DataError, match=r"l.jsonl:1: no field 'body' .*pass --text-field NAME to pick one"):
        list(iter_labeled(tmp_path / "l.jsonl", text_field="body"))
    with pytest.raises(DataError, match="labeled data must be"):
        list(iter_labeled(write(tmp_path / "t.txt", "x")))


# ---------------------------------------------------------------------------------------------
# spec kinds and stats


def test_glob_and_recursive_folder(tmp_path):
    write(tmp_path / "c/one.txt", "1")
    write(tmp_path / "c/sub/two.jsonl", '{"text": "2"}\n')
    write(tmp_path / "c/sub/skip.bin", b"\x00")  # unsupported files in a folder are skipped
    write(tmp_path / "c/.hidden/three.txt", "3")  # hidden folders too
    docs, stats = read(tmp_path / "c")
    assert docs == ["1", "2"] and stats.files == 2
    assert read(str(tmp_path / "c/**/*.jsonl"))[0] == ["2"]


def test_folder_skips_tokenizer_and_model_folders(tmp_path):
    """lmforge's own outputs under a data folder are never read as data; the folder itself being one is
    a one-line error naming what it is."""
    from lmforge.tokenizer import train

    write(tmp_path / "c/corpus.txt", "mine")
    train("bpe", ["the cat sat"] * 20, vocab_size=270).save(tmp_path / "c/tok")  # tokenizer train --out
    for name in ("hf", "hf-no-tokenizer"):  # convert --to-hf: config.json + weights (+ tokenizer.json)
        write(tmp_path / f"c/{name}/config.json", json.dumps({"model_type": "bert"}, indent=2))
        write(tmp_path / f"c/{name}/model.safetensors", b"\x00")
    write(tmp_path / "c/hf/tokenizer.json", (tmp_path / "c/tok/tokenizer.json").read_text())
    write(tmp_path / "c/hf/generation_config.json", "{\n}\n")
    write(tmp_path / "c/shards/meta.json", "{}")  # shard folders and run dirs, as before
    write(tmp_path / "c/shards/tokenizer.json", "{}")
    write(tmp_path / "c/run/run.yaml", "model: {}\n")
    write(tmp_path / "c/run/metrics.jsonl", '{"step": 1}\n')
    docs, stats = read(tmp_path / "c")
    assert docs == ["mine"] and stats.files == 1
    for name, what in [("tok", "a tokenizer or shard folder"), ("hf-no-tokenizer", "a model folder"),
                       ("run", "a run dir")]:
        with pytest.raises(DataError, match=f"folder .*{name} is {what} .* that lmforge wrote, not data"):
            read(tmp_path / "c" / name)


def test_quoted_glob_expands_home(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    write(tmp_path / "d/a.txt", "a")
    assert read("~/d/*.txt")[0] == ["a"] and read("~/d/a.txt")[0] == ["a"]


def test_named_source_reads_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    entry = tmp_path / "sources" / "shakespeare"
    write(entry / "docs.jsonl", '{"text": "cached play", "title": "x"}\n')
    write(entry / "info.json", '{"size_mb": 0.0, "docs": 1, "license": "PD"}')  # the mark: no fetch happens
    monkeypatch.setattr(sources, "download", lambda *a: pytest.fail("should not download"))
    assert read("shakespeare")[0] == ["cached play"]


def test_non_utf8_bytes_are_replaced_and_counted(tmp_path):
    write(tmp_path / "a.txt", b"caf\xe9 \xff\xfe ok")
    write(tmp_path / "b.jsonl", b'{"text": "na\xefve"}\n')
    write(tmp_path / "c.csv", b"text\nr\xe9sum\xe9\n")
    docs, stats = read(str(tmp_path / "*"))
    assert docs == ["caf\ufffd \ufffd\ufffd ok", "na\ufffdve", "r\ufffdsum\ufffd"]
    assert stats.replaced_bytes == 6 and stats.files == 3


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
@pytest.mark.parametrize("split", [4, 2**20])  # streamed in chunks, or read whole
def test_non_utf8_in_a_big_streamed_file(tmp_path, monkeypatch, name, split):
    monkeypatch.setattr(readers, "SPLIT_BYTES", split)
    write_text(tmp_path / name, "\ufeffhéllo\n".encode() + b"\xc3\n" + "wörld\n".encode())
    docs, stats = read(tmp_path / name)
    assert "".join(docs) == "héllo\n\ufffd\nwörld\n" and stats.replaced_bytes == 1


@pytest.mark.parametrize("name", ["a.txt", "a.txt.gz"])
@pytest.mark.parametrize("split", [4, 2**20])
def test_a_file_cut_off_inside_a_character_keeps_a_replacement_and_counts_its_bytes(tmp_path, monkeypatch,
                                                                                     name, split):
    """A file ending in 2 of the 3 bytes of '€' ends in one U+FFFD (as bytes.decode gives), counted as 2
    bytes: never silently dropped."""
    monkeypatch.setattr(readers, "SPLIT_BYTES", split)
    data = b"price 5\n" + "€".encode()[:2]
    write_text(tmp_path / name, data)
    docs, stats = read(tmp_path / name)
    assert "".join(docs) == data.decode("utf-8", errors="replace") == "price 5\n\ufffd"
    assert stats.replaced_bytes == 2


# ---------------------------------------------------------------------------------------------
# errors: one line, saying what to fix


@pytest.mark.parametrize("make, spec, message", [
    (None, "missing/file.txt", "no such file, folder or named source"),
    (None, "nothing/*.jsonl", "matches no files"),
    (("data.xml", "<a/>"), "data.xml", "unsupported file type '.xml'"),
    (("e/blank.txt", "\n\n"), "e", "no non-empty documents"),
    (("bad.jsonl", '{"text": "ok"}\n{oops\n'), "bad.jsonl", r"bad.jsonl:2: not valid JSON"),
    (("pretty.json", '{\n  "text": "x"\n}\n'), "pretty.json",
     r"pretty.json:1: a JSON object that does not end on its line; .* one JSON object per line "
     r"\(JSON lines\), or \(.json only\) one JSON array"),
    (("f.jsonl", '{"body": "x"}\n'), "f.jsonl", r"f.jsonl:1: no field 'text' \(fields: body\); pass --text-"),
    (("n.jsonl", '{"text": 5}\n'), "n.jsonl", r"n.jsonl:1: field 'text' is int"),
    (("two.csv", "a,b\nx,y\n"), "two.csv", r"no field 'text' \(fields: a, b\); pass --text-field"),
    (("ragged.csv", "text,b\nx\n"), "ragged.csv", r"ragged.csv:2: 1 fields where the header has 2"),
    (("x.parquet", "not parquet"), "x.parquet", "not a readable Parquet file"),
    (None, "empty-folder", "holds no"),
])
def test_errors(tmp_path, make, spec, message):
    if make:
        write(tmp_path / make[0], make[1])
    (tmp_path / "empty-folder").mkdir()
    with pytest.raises(DataError, match=message) as err:
        read(str(tmp_path / spec))
    assert "\n" not in str(err.value)


def _gz_lines(n: int) -> bytes:
    """n JSON lines of random (incompressible) text, gzipped: a cut anywhere lands mid-stream."""
    import random

    rng = random.Random(0)
    return gzip.compress("".join(json.dumps({"text": "".join(rng.choices("abcdefghij ", k=400))}) + "\n"
                                 for _ in range(n)).encode())


BAD_GZ = {
    "notgz.txt.gz": b"plain text\n",  # not gzip at all
    "notgz.jsonl.gz": b'{"text": "a"}\n',
    "notgz.csv.gz": b"text\na\n",
    "trunc.jsonl.gz": gzip.compress(b'{"text": "a"}\n')[:20],  # cut short
    "crc.txt.gz": gzip.compress(b"some text\n")[:-8] + b"\0" * 8,  # corrupt inside (bad CRC)
}


@pytest.mark.parametrize("name", BAD_GZ)
def test_bad_gzip_is_a_one_line_error(tmp_path, name):
    from lmforge.inference import read_texts

    path = write(tmp_path / name, BAD_GZ[name])
    with pytest.raises(DataError, match=r"not a valid gzip file \(.+\); re-download it or gunzip it") as err:
        read(str(path))
    assert str(err.value).startswith(str(path)) and "\n" not in str(err.value)
    with pytest.raises(DataError, match="not a valid gzip file"):
        read_texts(path)  # `lmforge embed --input`


def test_gzip_cut_short_fails_while_streaming(tmp_path):
    data = _gz_lines(2000)
    path = write(tmp_path / "big.jsonl.gz", data[: len(data) // 2])
    docs = iter_documents(str(path))
    assert len(next(docs)) == 400  # the first documents come out before the damage is reached
    with pytest.raises(DataError, match=r"big.jsonl.gz: not a valid gzip file \(Compressed file ended"):
        list(docs)


def test_big_txt_is_not_cut_at_a_blank_line_before_chunk_bytes(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "SPLIT_BYTES", 10)
    monkeypatch.setattr(readers, "CHUNK_BYTES", 20)
    monkeypatch.setattr(readers, "HARD_CHUNK_BYTES", 100)
    text = "ab\n\ncd\n\nefghijklmnopqrst\n\nuv\n"  # blank lines at 4, 8 (too early) and 26 bytes
    write(tmp_path / "big.txt", text)
    assert read(tmp_path / "big.txt")[0] == ["ab\n\ncd\n\nefghijklmnopqrst\n\n", "uv\n"]


def test_hidden_files_and_gzipped_parquet_are_not_data(tmp_path):
    write(tmp_path / "c/one.txt", "1")
    write(tmp_path / "c/.notes.txt", "private")  # a hidden file, like the hidden folders
    assert read(tmp_path / "c")[0] == ["1"]
    write(tmp_path / "d.parquet.gz", b"\x1f\x8b")
    with pytest.raises(DataError, match="unsupported file type"):
        read(tmp_path / "d.parquet.gz")


def test_csv_numeric_column_with_empty_cells_stays_numeric(tmp_path):
    write(tmp_path / "a.csv", "id,review,stars\n1,great,5\n2,bad,\n,meh,3\n")
    assert read(tmp_path / "a.csv")[0] == ["great", "bad", "meh"]


# ---------------------------------------------------------------------------------------------
# from a mutation audit


def test_csv_of_more_rows_than_the_column_sniffing_peek_keeps_every_row(tmp_path):
    write(tmp_path / "a.csv", "id,review\n" + "".join(f"{i},row {i}\n" for i in range(250)))
    assert read(tmp_path / "a.csv")[0] == [f"row {i}" for i in range(250)]  # none lost at row 101


def test_a_bom_does_not_hide_the_first_header_name(tmp_path):
    write(tmp_path / "a.csv", "\ufefftext,title\nbody one,T1\nbody two,T2\n")
    assert read(tmp_path / "a.csv")[0] == ["body one", "body two"]
    write(tmp_path / "a.jsonl", '\ufeff{"text": "first"}\r\n{"text": "second"}\r\n')
    assert read(tmp_path / "a.jsonl")[0] == ["first", "second"]
    write(tmp_path / "a.json", '\ufeff[{"text": "in an array"}]')
    assert read(tmp_path / "a.json")[0] == ["in an array"]


def test_stats_bytes_are_utf8_bytes_not_characters(tmp_path):
    write(tmp_path / "zh.txt", "今天天气很好")
    assert read(tmp_path / "zh.txt")[1].bytes == 18


def test_upper_case_extensions_are_read(tmp_path):
    write(tmp_path / "NOTES.TXT", "shouting")
    write(tmp_path / "D.JSONL.GZ", gzip.compress(b'{"text": "zipped"}\n'))
    assert read(tmp_path)[0] == ["zipped", "shouting"]
