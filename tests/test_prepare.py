"""prepare writes shards that decode to the input, split by document, identical on re-runs, atomically."""

import json
import random
import textwrap
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer as HF
from tokenizers import models, pre_tokenizers

from lmforge.cli import main
from lmforge.data.fastencode import Encoder, check_fast_path, fast_encoding
from lmforge.data.prepare import prepare
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.tokenizer import Tokenizer, train

ZH = "今天天气很好，我们去公园散步。人工智能正在改变世界。他说：“你好！”学习语言模型需要大量的数据。"
EMOJI = ["🙂", "👍🏽", "👨‍👩‍👧", "🇫🇷", "🎉", "🚀"]


def real_text() -> list[str]:
    """Real English prose and code: the sources of a few stdlib modules (shipped with every Python)."""
    return [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, json.decoder, random)]


def mixed(rng: random.Random, words: list[str]) -> str:
    """A messy string: words, contractions, CJK, emoji, digit runs, whitespace runs, punctuation."""
    pieces = []
    for _ in range(rng.randint(1, 30)):
        kind = rng.randrange(8)
        if kind == 0:
            pieces.append(ZH[rng.randrange(len(ZH)):][: rng.randint(1, 12)])
        elif kind == 1:
            pieces.append(rng.choice(EMOJI) * rng.randint(1, 3))
        elif kind == 2:
            pieces.append(str(rng.randint(0, 10**rng.randint(1, 15))))
        elif kind == 3:
            pieces.append(rng.choice([" ", "  ", "\n", "\n\n", "\t", " \t\n ", "\u00a0", "\r\n", "     "]))
        elif kind == 4:
            pieces.append(rng.choice(["'s", "'ll", "n't", "'S", "'re", "'ve", "'d", "'m", "''"]))
        elif kind == 5:
            pieces.append(rng.choice(["...", "--", "!?", "#!", "(x)", "{}", "=>", "café", "Ωμέγα", "привет"]))
        else:
            pieces.append(" " + rng.choice(words))
    return "".join(pieces)


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    rng = random.Random(0)
    docs = real_text()
    words = " ".join(docs).split()
    docs += [mixed(rng, words) for _ in range(300)]
    return docs


@pytest.fixture(scope="module")
def bpe(corpus, tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train("bpe", corpus, vocab_size=1500).save(path)
    return path


def read_split(out: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    meta = json.loads((out / "meta.json").read_text())
    ids = np.concatenate([np.fromfile(out / s, dtype=meta["dtype"]) for s in meta["splits"][split]["shards"]])
    return ids, np.load(out / split / "docs.npy")


def test_fast_path_ids_identical_to_tokenizers(bpe, corpus):
    tok = Tokenizer.load(bpe)
    enc, lut = fast_encoding(tok)
    assert enc is not None, lut
    rng = random.Random(1)
    words = corpus[0].split()
    texts = [mixed(rng, words) for _ in range(1500)] + corpus
    fast = Encoder(tok.inner.to_str(), "tiktoken").encode_lists(texts)
    slow = tok.encode_batch(texts)
    assert [f.tolist() for f in fast] == slow
    assert check_fast_path(tok, texts[:50]) is None


def test_shards_decode_to_the_documents(bpe, corpus, tmp_path):
    out = tmp_path / "shards"
    meta = prepare([], bpe, out, val_fraction=0.1, documents=corpus, progress=False, shard_tokens=5000)
    tok = Tokenizer.load(bpe)
    assert meta["dtype"] == "uint16" and meta["tokenizer_hash"] == tok.hash
    assert meta["separator_id"] == tok.eos_id == 0
    assert len(meta["splits"]["train"]["shards"]) > 1  # several 5000-token shards
    assert Tokenizer.load(out).hash == tok.hash  # tokenizer.json copied
    val_idx = [i for i in range(len(corpus)) if i >= 1 and -(-i // 10) > -(-(i - 1) // 10)]
    expect = {"val": [corpus[i] for i in val_idx],
              "train": [d for i, d in enumerate(corpus) if i not in set(val_idx)]}
    for split, docs in expect.items():
        ids, starts = read_split(out, split)
        assert meta["splits"][split]["documents"] == len(starts) == len(docs)
        assert meta["splits"][split]["tokens"] == len(ids)
        ends = np.r_[starts[1:], len(ids)]
        assert (ids[ends - 1] == 0).all()  # a separator after every document
        assert [tok.decode(ids[a:b - 1].tolist()) for a, b in zip(starts, ends)] == docs


def test_blank_documents_are_dropped_as_the_file_readers_drop_them(bpe, corpus, tmp_path):
    """Whitespace-only documents would otherwise become separator-only 'documents' in the shards."""
    with_blanks = [corpus[0], "   \n\t ", corpus[1], "", "\n\n"]
    meta = prepare([], bpe, tmp_path / "a", val_fraction=0, documents=with_blanks, progress=False)
    prepare([], bpe, tmp_path / "b", val_fraction=0, documents=corpus[:2], progress=False)
    assert meta["splits"]["train"]["documents"] == 2
    a, b = (read_split(tmp_path / name, "train")[0].tolist() for name in ("a", "b"))
    assert a == b
    # one real document among blanks is still cut into pieces for a val split, as when it is alone
    lone = prepare([], bpe, tmp_path / "c", documents=["  ", " ".join(corpus), "\n"], progress=False)
    alone = prepare([], bpe, tmp_path / "d", documents=[" ".join(corpus)], progress=False)
    assert lone["splits"] == alone["splits"] and lone["splits"]["val"]["documents"] > 0


def test_rerun_is_byte_identical_across_workers_and_encoders(bpe, corpus, tmp_path):
    docs = corpus * 3
    runs = [("w1", 1, "auto"), ("w2", 2, "auto"), ("slow", 1, "tokenizers")]
    for name, workers, encoder in runs:
        prepare([], bpe, tmp_path / name, workers=workers, encoder=encoder, documents=docs, progress=False)
    files = sorted(p.relative_to(tmp_path / "w1") for p in (tmp_path / "w1").rglob("*") if p.is_file())
    assert len(files) == 6  # meta, tokenizer, 2 x (shard + docs.npy)
    for name, _, _ in runs[1:]:
        for f in files:
            if f.name != "meta.json":
                assert (tmp_path / name / f).read_bytes() == (tmp_path / "w1" / f).read_bytes(), (name, f)


def test_guard_falls_back_when_tiktoken_would_differ(tmp_path, capsys):
    # merges a+b, b+c, a+bc: `tokenizers` leaves "abc" as [ab, c] (no merge ab+c); tiktoken would
    # join ab+c into the known token abc. The guard must catch it on the input and use tokenizers.
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<|endoftext|>": 0, **{c: i + 1 for i, c in enumerate(sorted(alphabet))}}
    for t in ("ab", "bc", "abc"):
        vocab[t] = len(vocab)
    inner = HF(models.BPE(vocab=vocab, merges=[("a", "b"), ("b", "c"), ("a", "bc")]))
    inner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    inner.add_special_tokens(["<|endoftext|>"])
    tok = Tokenizer(inner)
    tok.save(tmp_path / "tok")
    doc = "abc abc xabc"
    assert Encoder(inner.to_str(), "tiktoken").encode_lists([doc])[0].tolist() != tok.encode(doc)
    prepare([], tmp_path / "tok", tmp_path / "out", val_fraction=0, documents=[doc], progress=False)
    assert "fast path off" in capsys.readouterr().out
    ids, _ = read_split(tmp_path / "out", "train")
    assert ids.tolist() == tok.encode(doc) + [0]


def test_interrupted_run_leaves_nothing(bpe, corpus, tmp_path, monkeypatch):
    monkeypatch.setattr("lmforge.data.prepare.BATCH_CHARS", 5000)  # many batches: crash mid-write
    partial = []

    def docs_then_crash():
        yield from corpus
        partial.extend(p.stat().st_size for p in tmp_path.glob(".out.tmp-*/train/shard-00000.bin"))
        raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError):
        prepare([], bpe, tmp_path / "out", documents=docs_then_crash(), progress=False)
    assert partial and partial[0] > 0  # it did crash with shards half written
    assert list(tmp_path.iterdir()) == []  # no out/, no temp folder
    prepare([], bpe, tmp_path / "out", documents=corpus, progress=False)
    before = (tmp_path / "out" / "train" / "shard-00000.bin").read_bytes()
    with pytest.raises(RuntimeError):  # a failed re-run keeps the earlier complete output
        prepare([], bpe, tmp_path / "out", documents=docs_then_crash(), progress=False)
    assert (tmp_path / "out" / "train" / "shard-00000.bin").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_big_vocab_uses_uint32_and_refuses_uint16(tmp_path):
    inner = HF(models.WordLevel({f"w{i}": i for i in range(70000)}, unk_token="w0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.add_special_tokens(["</s>"])
    Tokenizer(inner).save(tmp_path / "tok")
    with pytest.raises(ConfigError, match="does not fit uint16"):
        prepare([], tmp_path / "tok", tmp_path / "out", dtype="uint16", documents=["w1"], progress=False)
    meta = prepare([], tmp_path / "tok", tmp_path / "out", val_fraction=0, documents=["w69999 w5"],
                   progress=False)
    ids, _ = read_split(tmp_path / "out", "train")
    assert meta["dtype"] == "uint32" and ids.tolist() == [69999, 5, 70000]


def test_cli_files_and_bad_input(bpe, tmp_path, capsys):
    good = tmp_path / "docs.jsonl"
    good.write_text("".join(json.dumps({"text": t}) + "\n" for t in ["one doc", "two doc", "three"]))
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\u00e9 au lait".encode("latin-1"))  # \xe9 alone is not UTF-8
    out = tmp_path / "out"
    rc = main(["prepare", "--data", str(good), "--data", str(bad), "--tokenizer", str(bpe),
               "--out", str(out), "--val-docs", "1", "--workers", "1"])
    text = capsys.readouterr().out
    assert rc == 0 and "; 1 invalid UTF-8 byte(s) replaced" in text
    meta = json.loads((out / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 1 and meta["splits"]["train"]["documents"] == 3
    assert meta["read_stats"]["replaced_bytes"] == 1

    junk = tmp_path / "junk.json"
    junk.write_text('{"not": "a tokenizer"}')
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    for argv in (
        ["--data", str(good), "--tokenizer", str(junk)],
        ["--data", str(tmp_path / "missing.txt"), "--tokenizer", str(bpe)],
        ["--data", str(empty), "--tokenizer", str(bpe)],
    ):
        assert main(["prepare", *argv, "--out", str(tmp_path / "o2")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "o2").exists()
    with pytest.raises(CheckpointError):
        prepare([str(good)], junk, tmp_path / "o3", progress=False)
    with pytest.raises(DataError, match="not a shard folder"):
        prepare([str(good)], bpe, tmp_path, progress=False)  # a folder with other files in it


@pytest.mark.parametrize("flag,value,least", [("--workers", "0", 1), ("--shard-tokens", "0", 1),
                                              ("--val-docs", "-1", 0)])
def test_bad_count_flag_is_named_with_its_value(flag, value, least, bpe, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("one doc")
    assert main(["prepare", "--data", str(data), "--tokenizer", str(bpe), "--out", str(tmp_path / "o"),
                 flag, value]) == 2
    assert capsys.readouterr().err == f"error: {flag} must be >= {least}, got {value}\n"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("kind,sep", [("wordpiece", "[SEP]"), ("unigram", "</s>")])
def test_other_families_use_their_separator(kind, sep, corpus, tmp_path):
    tok = train(kind, corpus, vocab_size=500, extra_ids=4)
    tok.save(tmp_path / "tok")
    docs = corpus[3:40]
    meta = prepare([], tmp_path / "tok", tmp_path / "out", val_fraction=0, documents=docs, progress=False)
    ids, starts = read_split(tmp_path / "out", "train")
    assert meta["separator_id"] == tok.token_to_id(sep) and meta["tokenizer_kind"] == kind
    expect = [i for d in docs for i in tok.encode(d) + [tok.token_to_id(sep)]]
    assert ids.tolist() == expect and len(starts) == len(docs)


def test_single_text_file_still_gets_a_val_split(bpe, tmp_path):
    paragraphs = [f"Paragraph {i}: the quick brown fox jumps over the lazy dog." for i in range(200)]
    src = tmp_path / "one.txt"
    src.write_text("\n\n".join(paragraphs))
    meta = prepare([str(src)], bpe, tmp_path / "out", val_fraction=0.05, progress=False)
    assert meta["splits"]["val"]["documents"] >= 3 and meta["splits"]["train"]["documents"] > 40
    train, _ = read_split(tmp_path / "out", "train")
    val, _ = read_split(tmp_path / "out", "val")
    tok = Tokenizer.load(bpe)
    text = tok.decode(np.concatenate([train, val]).tolist())
    assert all(p in text for p in paragraphs)  # nothing lost by the cut
    assert meta["split_lone_document"] is True
    # no val split asked for: the one document stays one document
    meta = prepare([str(src)], bpe, tmp_path / "whole", val_fraction=0, progress=False)
    assert meta["splits"]["train"]["documents"] == 1 and meta["split_lone_document"] is False


def test_a_file_of_one_long_line_still_gets_a_val_split(bpe, tmp_path):
    """A lone document without blank lines or line ends (one long line, trailing newline or not; a run
    of CJK text without spaces) is cut too: at spaces, else anywhere. It used to stay whole, so the val
    split came out empty and --val-docs N put everything in val."""
    tok = Tokenizer.load(bpe)
    for name, text in (("words.txt", " ".join(f"w{i % 50}" for i in range(3000)) + "\n"),
                       ("zh.txt", ZH * 40)):
        src = tmp_path / name
        src.write_text(text, encoding="utf-8")
        meta = prepare([str(src)], bpe, tmp_path / f"f-{name}", val_fraction=0.05, progress=False)
        assert meta["split_lone_document"] is True
        assert meta["splits"]["val"]["documents"] >= 3 and meta["splits"]["train"]["documents"] > 40, name
        meta = prepare([str(src)], bpe, tmp_path / f"d-{name}", val_docs=3, progress=False)
        assert meta["splits"]["val"]["documents"] == 3 and meta["splits"]["train"]["documents"] > 40
        val, val_starts = read_split(tmp_path / f"d-{name}", "val")
        train, _ = read_split(tmp_path / f"d-{name}", "train")
        sep = tok.separator_id
        pieces = [tok.decode([i for i in ids if i != sep]) for ids in np.split(val, val_starts[1:])]
        pieces.append(tok.decode([i for i in train.tolist() if i != sep]))
        assert "".join(pieces) == text  # nothing lost or reordered by the cut


def test_val_docs_0_asks_for_no_val_split_as_val_fraction_0_does(bpe, tmp_path, capsys):
    # --val-docs replaces --val-fraction, whose default the CLI still passes: N = 0 must not cut a lone
    # document for a val split nobody asked for, nor note that the val split came out empty
    src = tmp_path / "one.txt"
    src.write_text("\n\n".join(f"Paragraph {i}: the quick brown fox." for i in range(100)))
    common = ["prepare", "--data", str(src), "--tokenizer", str(bpe), "--workers", "1"]
    assert main([*common, "--out", str(tmp_path / "f0"), "--val-fraction", "0"]) == 0
    capsys.readouterr()
    assert main([*common, "--out", str(tmp_path / "d0"), "--val-docs", "0"]) == 0
    assert "val split is empty" not in capsys.readouterr().out
    f0, d0 = (json.loads((tmp_path / n / "meta.json").read_text()) for n in ("f0", "d0"))
    assert d0["split_lone_document"] is False and d0["splits"] == f0["splits"]
    assert d0["splits"]["train"]["documents"] == 1 and d0["splits"]["val"]["documents"] == 0
    shard = "train/shard-00000.bin"
    assert (tmp_path / "d0" / shard).read_bytes() == (tmp_path / "f0" / shard).read_bytes()


def test_tiktoken_forced_refuses_when_the_guard_finds_a_difference(bpe, corpus, tmp_path, monkeypatch,
                                                                   capsys):
    from lmforge.data import prepare as prep

    monkeypatch.setattr(prep, "check_fast_path", lambda tok, texts: "doc 0 token 3: 17 != 18")
    with pytest.raises(ConfigError, match="--encoder tiktoken would change the shards"):
        prepare([], bpe, tmp_path / "t", encoder="tiktoken", documents=corpus[:5], progress=False)
    assert not (tmp_path / "t").exists()
    meta = prepare([], bpe, tmp_path / "a", encoder="auto", documents=corpus[:5], progress=False)
    assert meta["splits"]["train"]["tokens"] > 0 and "using tokenizers" in capsys.readouterr().out


def test_shards_and_runs_kept_inside_the_data_folder_are_not_read_as_data(bpe, corpus, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for i, doc in enumerate(corpus[:20]):
        (data / f"{i:02d}.txt").write_text(doc, encoding="utf-8")
    first = prepare([str(data)], bpe, data / "shards", val_fraction=0.1, progress=False)
    (data / "run").mkdir()
    (data / "run" / "run.yaml").write_text("train: {}\n")
    (data / "run" / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    again = prepare([str(data)], bpe, data / "shards", val_fraction=0.1, progress=False)
    assert again["splits"] == first["splits"] and first["splits"]["train"]["documents"] == 18


def test_out_is_replaced_only_when_it_holds_nothing_but_shards(bpe, corpus, tmp_path, capsys):
    proj = tmp_path / "proj"  # a user's folder that merely has a meta.json
    (proj / "src").mkdir(parents=True)
    (proj / "meta.json").write_text("{}")
    (proj / "notes.txt").write_text("important")
    data = tmp_path / "docs.txt"
    data.write_text("one doc")
    assert main(["prepare", "--data", str(data), "--tokenizer", str(bpe), "--out", str(proj)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: {proj} exists and is not a shard folder (it holds notes.txt); choose an empty " \
                  "or new --out\n"
    assert (proj / "notes.txt").read_text() == "important" and (proj / "src").is_dir()
    (proj / "notes.txt").unlink()
    (proj / "src").rmdir()
    with pytest.raises(DataError, match=r"\(its meta.json is missing or not one lmforge wrote\)"):
        prepare([], bpe, proj, documents=corpus[:5], progress=False)

    shards = tmp_path / "shards"  # a real shard folder is replaced on a re-run ...
    first = prepare([], bpe, shards, documents=corpus[:5], progress=False)
    assert prepare([], bpe, shards, documents=corpus[:5], progress=False) == first
    (shards / "train" / "mine.txt").write_text("kept")  # ... but not once the user added a file to it
    with pytest.raises(DataError, match=r"is not a shard folder \(it holds train/mine.txt\)"):
        prepare([], bpe, shards, documents=corpus[:5], progress=False)
    assert (shards / "train" / "mine.txt").read_text() == "kept"


def test_a_lone_document_is_cut_into_about_the_pieces_asked_for():
    from lmforge.data.prepare import split_lone_document

    text = "".join(f"Paragraph {i}: some words here.\n\n" for i in range(200))
    for pieces in (4, 16):
        docs = list(split_lone_document([text], pieces=pieces))
        assert "".join(docs) == text  # cut at blank lines, nothing lost
        assert pieces / 2 <= len(docs) <= pieces + 1, (pieces, len(docs))
        assert all(d.endswith("\n\n") for d in docs)
    crlf = text.replace("\n", "\r\n")  # a Windows file: its blank lines are \r\n\r\n, not \n\n
    docs = list(split_lone_document([crlf], pieces=16))
    assert "".join(docs) == crlf and all(d.endswith("\r\n\r\n") for d in docs) and len(docs) >= 8


def test_two_workers_keep_document_order_over_many_batches(bpe, corpus, tmp_path, monkeypatch):
    """Results come back from the pool in submission order, up to the last batches in flight."""
    monkeypatch.setattr("lmforge.data.prepare.BATCH_CHARS", 5000)  # dozens of batches
    for name, workers in (("w1", 1), ("w2", 2)):
        prepare([], bpe, tmp_path / name, workers=workers, documents=corpus, progress=False)
    for split in ("train", "val"):
        a, b = read_split(tmp_path / "w1", split), read_split(tmp_path / "w2", split)
        assert a[0].tolist() == b[0].tolist() and a[1].tolist() == b[1].tolist()


def test_a_rerun_replaces_the_folder_and_leaves_nothing_beside_it(bpe, corpus, tmp_path):
    for _ in range(3):
        prepare([], bpe, tmp_path / "out", documents=corpus[:5], progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_a_65536_token_vocabulary_fits_uint16(tmp_path):
    """ids 0 .. 65,535 are exactly uint16's range: the largest id is stored and read back as itself."""
    inner = HF(models.WordLevel({f"w{i}": i for i in range(65535)}, unk_token="w0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.add_special_tokens(["</s>"])  # id 65535: vocab size 65,536
    Tokenizer(inner).save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").vocab_size == 2**16
    for dtype in ("auto", "uint16"):
        meta = prepare([], tmp_path / "tok", tmp_path / dtype, val_fraction=0, dtype=dtype,
                       documents=["w65534 w7"], progress=False)
        ids, _ = read_split(tmp_path / dtype, "train")
        assert meta["dtype"] == "uint16" and ids.tolist() == [65534, 7, 65535]


def test_cli_settings_reach_prepare(bpe, corpus, tmp_path, capsys):
    """Each flag means what the same keyword means to `prepare`: the shards are byte-identical."""
    data = tmp_path / "docs.jsonl"
    docs = corpus[3:40]
    data.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs))
    assert main(["prepare", "--data", str(data), "--tokenizer", str(bpe), "--out", str(tmp_path / "cli"),
                 "--text-field", "body", "--val-fraction", "0.2", "--dtype", "uint32",
                 "--shard-tokens", "500", "--encoder", "tokenizers", "--workers", "1"]) == 0
    assert "(tokenizers, 1 worker(s))" in capsys.readouterr().out  # the encoder asked for, not tiktoken
    prepare([str(data)], bpe, tmp_path / "ref", val_fraction=0.2, text_field="body", dtype="uint32",
            shard_tokens=500, progress=False)
    capsys.readouterr()
    cli, ref = (json.loads((tmp_path / d / "meta.json").read_text()) for d in ("cli", "ref"))
    assert cli["dtype"] == "uint32" and len(cli["splits"]["train"]["shards"]) > 1
    assert cli["splits"] == ref["splits"] and cli["splits"]["val"]["documents"] > 1
    for split in ("train", "val"):
        assert [a.tolist() for a in read_split(tmp_path / "cli", split)] == \
               [a.tolist() for a in read_split(tmp_path / "ref", split)]
    assert main(["prepare", "--data", str(data), "--tokenizer", str(bpe), "--out", str(tmp_path / "val"),
                 "--text-field", "body", "--val-docs", "3", "--workers", "2"]) == 0
    meta = json.loads((tmp_path / "val" / "meta.json").read_text())
    assert meta["splits"]["val"]["documents"] == 3 and "2 worker(s)" in capsys.readouterr().out


def _rerun_setup(corpus, bpe, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus[:30]))
    out = tmp_path / "out"
    args = ["prepare", "--data", str(docs), "--tokenizer", str(bpe), "--out", str(out), "--workers", "1"]
    assert main(args) == 0
    return args, out, {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}


@pytest.mark.parametrize("fault", ["fsync", "replace", "ctrl-c"])
def test_a_rerun_that_fails_writing_keeps_the_old_shards_and_says_one_line(bpe, corpus, tmp_path, capsys,
                                                                           monkeypatch, fault):
    import os

    args, out, before = _rerun_setup(corpus, bpe, tmp_path)
    capsys.readouterr()
    name = "fsync" if fault == "fsync" else "replace"  # the first of each: meta.json, the completion mark
    real, exc = getattr(os, name), KeyboardInterrupt() if fault == "ctrl-c" else OSError(28, "No space left")
    monkeypatch.setattr(os, name, lambda *a, **k: (_ for _ in ()).throw(exc))
    rc = main(args)
    monkeypatch.setattr(os, name, real)
    err = capsys.readouterr().err
    assert rc == (130 if fault == "ctrl-c" else 2) and err.count("\n") == 1, err
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs.jsonl", "out"]  # no .out.tmp-* left
    assert read_split(out, "train")[0].size > 0


def test_a_rerun_whose_final_rename_fails_keeps_the_old_shards(bpe, corpus, tmp_path, capsys, monkeypatch):
    import os

    args, out, before = _rerun_setup(corpus, bpe, tmp_path)
    real = os.replace

    def replace(src, dst):  # the new folder's rename onto out fails (the old one is already aside)
        if Path(dst) == out and Path(src).name.startswith(".out.tmp-"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main(args) == 2
    monkeypatch.undo()
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_a_65537_token_vocabulary_needs_uint32(tmp_path):
    """One id past uint16's range (id 65,536) would wrap to 0 in uint16: auto picks uint32, uint16 refuses."""
    inner = HF(models.WordLevel({f"w{i}": i for i in range(65536)}, unk_token="w0"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    inner.add_special_tokens(["</s>"])  # id 65536: vocab size 65,537
    Tokenizer(inner).save(tmp_path / "tok")
    assert Tokenizer.load(tmp_path / "tok").vocab_size == np.iinfo(np.uint16).max + 2
    with pytest.raises(ConfigError, match="does not fit uint16"):
        prepare([], tmp_path / "tok", tmp_path / "u16", dtype="uint16", documents=["w1"], progress=False)
    meta = prepare([], tmp_path / "tok", tmp_path / "auto", val_fraction=0, documents=["w65535 w7"],
                   progress=False)
    ids, _ = read_split(tmp_path / "auto", "train")
    assert meta["dtype"] == "uint32" and ids.tolist() == [65535, 7, 65536]


@pytest.mark.parametrize("val", [dict(val_fraction=0.05), dict(val_docs=7)])
def test_the_split_does_not_depend_on_how_documents_are_batched(bpe, corpus, tmp_path, monkeypatch, val):
    """Document i goes to val by its index in the whole input, never by its place in a worker batch."""
    prepare([], bpe, tmp_path / "one", documents=corpus, progress=False, **val)  # a single batch
    monkeypatch.setattr("lmforge.data.prepare.BATCH_CHARS", 3000)  # dozens of batches
    prepare([], bpe, tmp_path / "many", documents=corpus, progress=False, **val)
    n = len(corpus)
    if "val_docs" in val:
        val_idx = list(range(7))
    else:  # i >= 1 and ceil(i / 20) > ceil((i - 1) / 20): documents 1, 21, 41, ...
        val_idx = [i for i in range(1, n) if -(-i // 20) > -(-(i - 1) // 20)]
    assert val_idx[:3] in ([1, 21, 41], [0, 1, 2])
    tok = Tokenizer.load(bpe)
    for split, want in (("val", val_idx), ("train", [i for i in range(n) if i not in set(val_idx)])):
        for name in ("one", "many"):
            ids, starts = read_split(tmp_path / name, split)
            ends = np.r_[starts[1:], len(ids)]
            got = [tok.decode(ids[a:b - 1].tolist()) for a, b in zip(starts, ends)]
            assert got == [corpus[i] for i in want], (split, name)


def test_every_shard_but_the_last_holds_exactly_shard_tokens(bpe, corpus, tmp_path):
    meta = prepare([], bpe, tmp_path / "out", val_fraction=0, documents=corpus, shard_tokens=777,
                   dtype="uint32", progress=False)
    shards = meta["splits"]["train"]["shards"]
    sizes = [(tmp_path / "out" / s).stat().st_size // 4 for s in shards]
    assert len(sizes) > 2 and sizes[:-1] == [777] * (len(sizes) - 1) and 0 < sizes[-1] <= 777
    assert sum(sizes) == meta["splits"]["train"]["tokens"]


def test_document_0_never_goes_to_val():
    from lmforge.data.prepare import val_mask

    assert val_mask(0, 6, 0.5, None).tolist() == [False, True, False, True, False, True]
    assert val_mask(0, 3, 0.99, None).tolist() == [False, True, True]
    assert val_mask(0, 4, 0.0, 2).tolist() == [True, True, False, False]  # --val-docs: the first N


def test_val_fraction_and_val_docs_together_are_a_usage_error(bpe, tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("one doc")
    with pytest.raises(SystemExit) as e:
        main(["prepare", "--data", str(data), "--tokenizer", str(bpe), "--out", str(tmp_path / "o"),
              "--val-fraction", "0.5", "--val-docs", "1"])
    assert e.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
