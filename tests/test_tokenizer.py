"""Trained tokenizers load in transformers with identical ids; BPE is lossless; specials and errors hold."""

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import PreTrainedTokenizerFast

from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError
from lmforge.tokenizer import TYPES, Tokenizer, build, capped, train
from lmforge.tokenizer_cli import language_of, stats

ZH = ["今天天气很好，我们去公园散步。", "人工智能正在改变世界。", "学习语言模型需要大量的数据。",
      "他说：“你好！”"]
TEXTS = [
    "The quick brown fox jumps over the lazy dog. It's 2024, isn't it?",
    "今天天气很好，我们去公园散步。",
    "emoji 🙂👍🏽 family 👨‍👩‍👧 and flags 🇫🇷",
    "mixed: café 中文 and 🚀 launch at 09:30 -- done!\n\n\t  indented   ",
    "    def f(x):\n        return x ** 2  # squares\r\n",
]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    """Real English (stdlib sources shipped with Python) plus Chinese and emoji lines."""
    rng = random.Random(0)
    docs = [Path(m.__file__).read_text(encoding="utf-8") for m in (textwrap, json.decoder, random)]
    docs += ["".join(rng.choice(ZH) for _ in range(5)) + " 🙂" for _ in range(200)]
    return docs


@pytest.fixture(scope="module")
def toks(corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("toks")
    out = {}
    for kind, vocab in (("bpe", 800), ("wordpiece", 800), ("unigram", 400)):
        tok = train(kind, iter(corpus), vocab_size=vocab, extra_ids=10)  # a one-shot iterator is enough
        out[kind] = (tok, tok.save(root / kind))
    return out


def test_bpe_round_trips_any_text_exactly(toks):
    tok, _ = toks["bpe"]
    for text in TEXTS + ["", " ", "\u00a0\u3000", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢 ∑ 💯💯", "x" * 500]:
        assert tok.decode(tok.encode(text)) == text


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_transformers_loads_and_encodes_identically(toks, kind):
    tok, path = toks[kind]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert len(hf) == tok.vocab_size
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == tok.encode(text)
        assert hf.encode(text) == tok.encode(text, add_special_tokens=True)
        assert hf.decode(tok.encode(text)) == tok.decode(tok.encode(text))


def test_special_tokens_per_family(toks):
    bpe, wp, uni = (toks[k][0] for k in ("bpe", "wordpiece", "unigram"))
    assert (bpe.eos_id, bpe.bos_id, bpe.pad_id, bpe.separator_id) == (0, 0, 0, 0)
    assert bpe.token_to_id("<|im_start|>") == 1 and bpe.token_to_id("<|im_end|>") == 2
    assert bpe.encode("a<|im_end|>") == bpe.encode("a") + [2]  # chat markers stay one token
    assert (wp.pad_id, wp.unk_id, wp.cls_id, wp.sep_id, wp.mask_id) == (0, 1, 2, 3, 4)
    assert wp.eos_id is None and wp.separator_id == wp.sep_id
    pair = wp.inner.encode("hello world", "the end")
    assert pair.ids[0] == wp.cls_id and pair.ids.count(wp.sep_id) == 2 and pair.ids[-1] == wp.sep_id
    first_sep = pair.ids.index(wp.sep_id)
    assert pair.type_ids == [0] * (first_sep + 1) + [1] * (len(pair.ids) - first_sep - 1)
    assert (uni.pad_id, uni.eos_id, uni.unk_id, uni.separator_id) == (0, 1, 2, 1)
    assert [uni.token_to_id(f"<extra_id_{i}>") for i in (0, 9)] == [3, 12]
    assert uni.token_to_id("<extra_id_10>") is None
    assert uni.encode("hello", add_special_tokens=True)[-1] == uni.eos_id


def test_wordpiece_splits_chinese_into_characters_and_lowercases(toks):
    wp, _ = toks["wordpiece"]
    assert [wp.id_to_token(i) for i in wp.encode("今天天气")] == ["今", "天", "天", "气"]
    assert wp.encode("THE Return") == wp.encode("the return")


def test_wordpiece_cleans_text_as_berts_own_tokenizer_does(toks, tmp_path):
    """transformers' BertTokenizer over the same vocab.txt drops control characters and U+FFFD, and
    reads tabs and no-break spaces as spaces (BertNormalizer clean_text): ids must agree."""
    from transformers import BertTokenizer

    wp, _ = toks["wordpiece"]
    vocab = sorted(wp.inner.get_vocab().items(), key=lambda kv: kv[1])
    assert [i for _, i in vocab] == list(range(len(vocab)))
    (tmp_path / "vocab.txt").write_text("".join(t + "\n" for t, _ in vocab), encoding="utf-8")
    bert = BertTokenizer(str(tmp_path / "vocab.txt"))
    for text in ["the\x00 ret\x07urn\u200b", "tab\there\r\nand\u00a0there", "x\ufffdy \x1b[0m", *TEXTS]:
        assert wp.encode(text) == bert.encode(text, add_special_tokens=False), repr(text)
    assert wp.encode("ret\x07urn") == wp.encode("return")


def test_training_is_reproducible(corpus):
    """Same data and options: BPE and WordPiece give the same tokenizer.json, Unigram the same
    pieces (its EM sums floats in a parallel, order-dependent way, so scores may move in the 3rd
    decimal). Each training builds fresh, randomly seeded hash maps, so an order dependence shows
    here: one-pass WordPiece (huggingface/tokenizers#1794) gave 5 different vocabs in 5 runs."""
    docs = corpus[:2] + corpus[-30:]
    for kind in ("bpe", "wordpiece"):
        runs = {train(kind, d, vocab_size=400, min_frequency=1).inner.to_str()
                for d in (docs, iter(docs), docs)}
        assert len(runs) == 1, kind
    a, b = (dict(json.loads(train("unigram", docs, vocab_size=400).inner.to_str())["model"]["vocab"])
            for _ in range(2))
    assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 0.05 for k in a)


def test_wordpiece_reserved_pieces_are_ordinary_vocab(toks):
    """The ##x pieces reserved for reproducibility are vocab entries, not added special tokens."""
    tok, _ = toks["wordpiece"]
    spec = json.loads(tok.inner.to_str())
    assert [t["content"] for t in spec["added_tokens"]] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    assert tok.decode(tok.encode("tokenizers")) == "tokenizers"
    assert [tok.id_to_token(i) for i in tok.encode("x ##e")] == ["x", "#", "#", "e"]  # not one special


def test_hash_ignores_formatting_and_tracks_content(toks, tmp_path):
    tok, path = toks["bpe"]
    compact = tmp_path / "compact.json"
    compact.write_text(tok.inner.to_str(pretty=False))
    assert Tokenizer.load(compact).hash == tok.hash == Tokenizer.load(path.parent).hash
    assert toks["wordpiece"][0].hash != tok.hash


def test_not_a_tokenizer_is_a_one_line_error(tmp_path, capsys):
    junk = tmp_path / "model.bin"
    junk.write_bytes(b"\x00\x01 definitely not json")
    for bad in (junk, tmp_path / "missing.json", tmp_path):
        with pytest.raises(CheckpointError):
            Tokenizer.load(bad)
    assert main(["tokenizer", "stats", str(junk), "--data", str(junk)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "not a tokenizer.json" in err
    with pytest.raises(ConfigError, match="too small"):
        train("bpe", ["abc"], vocab_size=100)


def test_text_that_is_not_utf8_is_a_one_line_error(toks):
    """A command-line argument in another encoding reaches Python as lone surrogates ('\udcff' for the
    byte 0xff), which `tokenizers` refuses with a TypeError."""
    from lmforge.errors import DataError

    for tok, _ in toks.values():
        with pytest.raises(DataError, match=r"not valid UTF-8 \(byte 0xff at character 2\)"):
            tok.encode("ab\udcffc")
        with pytest.raises(DataError, match="not valid UTF-8"):
            tok.encode_batch(["fine", "ab\udcff"])
        assert tok.encode("ab") == tok.encode_batch(["ab"])[0]


def test_stats_per_language(toks):
    tok, _ = toks["bpe"]
    docs = ["the cat sat on the mat", "今天天气很好", "another English line here"]
    table = stats(tok, docs)
    assert language_of(docs[1]) == "zh" and set(table) == {"zh", "other"}
    zh, other = table["zh"], table["other"]
    assert zh["tokens"] == len(tok.encode(docs[1])) and zh["chars"] == 6
    assert zh["tokens_per_char"] == pytest.approx(zh["tokens"] / 6)
    n_other = len(tok.encode(docs[0])) + len(tok.encode(docs[2]))
    assert other["tokens_per_word"] == pytest.approx(n_other / 10)
    assert other["bytes_per_token"] == pytest.approx((len(docs[0]) + len(docs[2])) / n_other)
    # sample_bytes: once that many bytes are read, no further document is
    assert stats(tok, docs, sample_bytes=len(docs[0])) == stats(tok, docs[:1])


def test_cli_train_and_stats(corpus, tmp_path, capsys):
    data = tmp_path / "docs.jsonl"
    data.write_text("".join(json.dumps({"body": d}) + "\n" for d in corpus))
    rc = main(["tokenizer", "train", "--type", "wordpiece", "--data", str(data), "--text-field", "body",
               "--vocab-size", "600", "--out", str(tmp_path / "tok")])
    assert rc == 0
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.kind == "wordpiece" and tok.vocab_size <= 600
    capsys.readouterr()
    assert main(["tokenizer", "stats", str(tmp_path / "tok"), "--data", str(data),
                 "--text-field", "body"]) == 0
    out = capsys.readouterr().out
    assert "vocab size" in out and "tokens/char" in out and "tokens/word" in out


def test_cli_train_notes_replaced_bytes_and_a_vocabulary_smaller_than_asked(tmp_path, capsys):
    data = tmp_path / "latin1.txt"
    data.write_bytes("caf\u00e9 cr\u00e8me na\u00efve\n".encode("latin-1") * 50)  # 3 bad bytes a line
    assert main(["tokenizer", "train", "--type", "bpe", "--data", str(data), "--vocab-size", "100000",
                 "--out", str(tmp_path / "tok")]) == 0
    err = capsys.readouterr().err
    assert "note: 150 input byte(s) were not valid UTF-8 and became U+FFFD" in err
    size = Tokenizer.load(tmp_path / "tok").vocab_size
    assert f"note: the data gave {size:,} tokens, fewer than --vocab-size 100,000" in err
    assert main(["tokenizer", "train", "--type", "bpe", "--data", str(data), "--vocab-size", str(size),
                 "--out", str(tmp_path / "full")]) == 0  # the data fills exactly that size: nothing to say
    assert Tokenizer.load(tmp_path / "full").vocab_size == size
    assert "fewer than" not in capsys.readouterr().err


def test_cli_train_out_never_overwrites_silently(tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("the cat sat on the mat\n" * 50)
    args = ["tokenizer", "train", "--type", "bpe", "--data", str(data), "--vocab-size", "270"]
    assert main([*args, "--out", str(tmp_path / "tok")]) == 0
    first = (tmp_path / "tok" / "tokenizer.json").read_text()
    (tmp_path / "tok" / "tokenizer.json").write_text(first + " ")  # ours: must survive a refusal
    # a folder and the same folder's tokenizer.json name the same file; both refuse without --overwrite
    for out in (tmp_path / "tok", tmp_path / "tok" / "tokenizer.json"):
        capsys.readouterr()
        assert main([*args, "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "pass --overwrite" in err, err
        assert str(tmp_path / "tok" / "tokenizer.json") in err
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == first + " "
    assert main([*args, "--out", str(tmp_path / "tok"), "--overwrite"]) == 0
    assert (tmp_path / "tok" / "tokenizer.json").read_text() == first
    # a path ending in .json is the output file itself (any name); a plain file is not a folder
    assert main([*args, "--out", str(tmp_path / "other" / "bpe.json")]) == 0
    assert Tokenizer.load(tmp_path / "other" / "bpe.json").hash == Tokenizer.load(tmp_path / "tok").hash
    (tmp_path / "notes").write_text("mine")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "notes")]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
    assert (tmp_path / "notes").read_text() == "mine"
    # the Python API keeps replacing, as quickstart relies on; a folder named *.json is a folder
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.save(tmp_path / "tok") == tmp_path / "tok" / "tokenizer.json"
    (tmp_path / "dir.json").mkdir()
    assert tok.save(tmp_path / "dir.json") == tmp_path / "dir.json" / "tokenizer.json"


@pytest.mark.parametrize("folder,markers,what", [
    ("run", ["run.yaml", "checkpoints/step-000002/model.safetensors"], "a run dir (run.yaml)"),
    ("run/checkpoints/step-000002", ["config.json", "model.safetensors", "trainer_state.pt"],
     "a model folder (config.json + weights)"),
    ("hf", ["config.json", "model.safetensors"], "a model folder (config.json + weights)"),
    ("shards", ["meta.json", "train/shard-00000.bin", "train/docs.npy"], "a shard folder (meta.json)"),
])
def test_cli_train_out_never_replaces_the_tokenizer_of_a_run_model_or_shards(folder, markers, what,
                                                                             tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("the cat sat on the mat\n" * 50)
    out = tmp_path / folder
    for name in [*markers, "tokenizer.json"]:
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(f"{folder}'s own {name}")
    args = ["tokenizer", "train", "--type", "bpe", "--data", str(data), "--vocab-size", "300", "--overwrite"]
    for where in (out, out / "tokenizer.json"):
        assert main([*args, "--out", str(where)]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {out} is {what}, not a tokenizer folder: its tokenizer.json must stay the " \
                      "one it was made with; choose another --out\n", err
    assert (out / "tokenizer.json").read_text() == f"{folder}'s own tokenizer.json"
    assert main([*args, "--out", str(tmp_path / "tok")]) == 0  # another --out is fine


def test_wordpiece_says_when_the_alphabet_outgrows_the_vocab_size(tmp_path, capsys):
    rng = random.Random(0)
    letters = [chr(c) for c in range(0x100, 0x500) if chr(c).isalpha() and chr(c).islower()]
    data = tmp_path / "many.txt"
    data.write_text(" ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(2000)))
    args = ["tokenizer", "train", "--type", "wordpiece", "--data", str(data), "--out"]
    assert main([*args, str(tmp_path / "small"), "--vocab-size", "300"]) == 0
    err = capsys.readouterr().err
    tok = Tokenizer.load(tmp_path / "small")
    chars = sum(len(t) == 1 for t in tok.inner.get_vocab())
    assert tok.vocab_size == 5 + 2 * chars > 300  # every character, also as ##x: the result is as before
    assert err.startswith(f"note: the wordpiece vocab has {tok.vocab_size:,} tokens, more than --vocab-size "
                          f"300: it always holds every character of the text ({chars:,}), their ##x")
    assert err.count("\n") == 1, err
    assert main([*args, str(tmp_path / "big"), "--vocab-size", "900"]) == 0
    assert "more than --vocab-size" not in capsys.readouterr().err
    assert Tokenizer.load(tmp_path / "big").vocab_size <= 900


def test_unigram_too_small_for_the_alphabet_is_a_one_line_error(tmp_path, capsys):
    rng = random.Random(0)
    letters = [chr(c) for c in range(0x100, 0x500) if chr(c).isalpha() and chr(c).islower()]
    data = tmp_path / "many.txt"
    data.write_text(" ".join("".join(rng.choice(letters) for _ in range(4)) for _ in range(2000)))
    assert main(["tokenizer", "train", "--type", "unigram", "--data", str(data), "--vocab-size", "200",
                 "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert err == ("error: --vocab-size 200 is too small for unigram on this text: the vocab must hold every "
                   "character it uses; raise --vocab-size\n")
    assert not (tmp_path / "tok").exists()


def test_negative_extra_ids_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ConfigError, match="--extra-ids must be >= 0"):
        train("unigram", ["a b c"] * 10, vocab_size=200, extra_ids=-1)
    data = tmp_path / "docs.txt"
    data.write_text("the cat sat on the mat\n" * 50)
    assert main(["tokenizer", "train", "--type", "unigram", "--data", str(data), "--vocab-size", "200",
                 "--extra-ids", "-1", "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --extra-ids must be >= 0") and err.count("\n") == 1, err
    assert not (tmp_path / "tok").exists()


def test_bad_min_frequency_and_sample_mb_are_one_line_errors(tmp_path, capsys):
    data = tmp_path / "docs.txt"
    data.write_text("the cat sat on the mat\n" * 50)
    assert main(["tokenizer", "train", "--type", "bpe", "--data", str(data), "--vocab-size", "300",
                 "--min-frequency", "-3", "--out", str(tmp_path / "tok")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --min-frequency must be >= 0") and "got -3" in err and err.count("\n") == 1
    assert not (tmp_path / "tok").exists()
    assert main(["tokenizer", "train", "--type", "bpe", "--data", str(data), "--vocab-size", "300",
                 "--min-frequency", "0", "--out", str(tmp_path / "tok")]) == 0
    stats_args = ["tokenizer", "stats", str(tmp_path / "tok"), "--data", str(data), "--sample-mb"]
    for mb in ("0", "-1", "nan"):
        capsys.readouterr()
        assert main([*stats_args, mb]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: --sample-mb must be a positive number"), err
        assert err.count("\n") == 1, err
    assert main([*stats_args, "1e-9"]) == 0
    assert "docs       1" in capsys.readouterr().out  # a tiny sample still measures one document


@pytest.mark.parametrize("sequence", [False, True], ids=["template", "sequence"])
def test_prompts_start_with_bos_where_the_tokenizer_says_so(toks, sequence):
    """Llama-style files put <s> in front of every encoding; a generation prompt must have it too,
    as `tokenizer(text)` in transformers does. Our byte-level BPE adds nothing."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers, processors

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    inner = HFTok(models.WordLevel(vocab, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.Whitespace()
    inner.add_special_tokens(["<unk>", "<s>", "</s>"])
    template = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                             special_tokens=[("<s>", 1)])
    inner.post_processor = processors.Sequence([processors.ByteLevel(), template]) if sequence else template
    llama = Tokenizer(inner)
    hf = PreTrainedTokenizerFast(tokenizer_object=inner)
    assert llama.encode_prompt("hello world") == hf("hello world").input_ids == [1, 3, 4]
    assert llama.encode_prompt("") == [1]
    bpe, _ = toks["bpe"]
    assert bpe.encode_prompt("hello") == bpe.encode("hello") and bpe.encode_prompt("") == [bpe.bos_id]


def test_vocab_size_is_the_largest_id_plus_one_even_with_gaps():
    """A tokenizer.json whose ids skip numbers (an HF file with reserved slots) needs an embedding of
    max id + 1 rows, not one row per token."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models

    inner = HFTok(models.WordLevel({"<unk>": 0, "a": 1, "b": 7}, unk_token="<unk>"))
    inner.add_special_tokens(["</s>"])  # `tokenizers` gives it the next count, 3, inside the gap
    tok = Tokenizer(inner)
    assert tok.token_to_id("</s>") == 3 == tok.eos_id
    assert tok.vocab_size == 8 and tok.encode("b") == [7]


def test_vocab_size_floor_is_exclusive():
    """bpe: 3 specials + 256 byte tokens + room for one merge at least: 259 is refused, 260 trains."""
    with pytest.raises(ConfigError, match="--vocab-size 259 is too small for bpe; use more than 259"):
        train("bpe", ["abc abc"], vocab_size=259)
    assert train("bpe", ["abc abc"] * 5, vocab_size=260).vocab_size <= 260


def test_cli_train_is_the_library_train_with_the_same_settings(tmp_path, capsys):
    from lmforge.data.readers import iter_documents

    data = tmp_path / "docs.txt"
    data.write_text("The Cat sat on the Mat\n" * 50 + "Zyxwv Qrstu once\n")  # pairs seen once: min_frequency
    docs = list(iter_documents(str(data)))

    def pieces(tok):  # not the hash: unigram's scores move a little from run to run, its pieces do not
        return set(tok.inner.get_vocab())

    for kind, vocab, flags, kwargs, other in [
        ("bpe", 300, [], {}, dict(min_frequency=1)),
        ("wordpiece", 300, ["--cased"], dict(lowercase=False), dict(lowercase=True)),
        ("wordpiece", 300, ["--min-frequency", "1"], dict(min_frequency=1), {}),
        ("unigram", 200, [], {}, dict(extra_ids=10)),
    ]:
        out = tmp_path / f"{kind}-{len(flags)}"
        assert main(["tokenizer", "train", "--type", kind, "--data", str(data), "--vocab-size", str(vocab),
                     "--out", str(out), *flags]) == 0
        ref = pieces(train(kind, docs, vocab, **kwargs))
        assert pieces(Tokenizer.load(out)) == ref, (kind, flags)
        assert pieces(train(kind, docs, vocab, **other)) != ref, (kind, other)  # the setting shows here


def test_cli_stats_prints_each_language_with_its_own_measure(toks, tmp_path, capsys):
    tok, path = toks["wordpiece"]
    en, zh = "the cat sat on the mat ☃", "今天 天气很好"  # ☃ is not in the training text: [UNK]
    (tmp_path / "en.txt").write_text(en)
    (tmp_path / "zh.txt").write_text(zh)
    assert main(["tokenizer", "stats", str(path), "--data", str(tmp_path / "en.txt"), "--data",
                 str(tmp_path / "zh.txt")]) == 0  # --data is repeatable: both files are measured
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"wordpiece tokenizer, vocab size {tok.vocab_size:,}"
    other, chinese = (next(ln for ln in lines if ln.startswith(f"  {lang} ")) for lang in ("other", "zh"))
    ids_en, ids_zh = tok.encode(en), tok.encode(zh)
    assert ids_en.count(tok.unk_id) == 1
    assert f"tokens/word {len(ids_en) / 7:.3f}" in other and "tokens/char" not in other
    assert f"unk {100 / len(ids_en):.2f}%" in other
    assert f"tokens/char {len(ids_zh) / 6:.3f}" in chinese and "tokens/word" not in chinese  # 6: no space
    assert f"bytes/token {len(zh.encode()) / len(ids_zh):.3f}" in chinese and " docs       1 " in chinese


@pytest.mark.parametrize("text, lang", [
    ("中中中" + "abcdefg", "other"),             # 3 of 10 letters: exactly 30% is not more than 30%
    ("中中中" + "abcdef", "zh"),                 # 3 of 9: 33%
    ("中" * 30 + "a" * 70, "other"),             # 30 of 100
    ("中" * 31 + "a" * 69, "zh"),                # 31 of 100
    ("中中中 abcdef 1234567890, !?。，", "zh"),   # only letters count: digits, spaces, punctuation do not
    ("中中中 ａｂｃｄｅｆｇ", "other"),            # fullwidth Latin letters are letters, not ideographs
    ("", "other"), ("1234 。，！", "other"),      # no letters at all
], ids=["3-of-10", "3-of-9", "30-of-100", "31-of-100", "letters-only", "fullwidth-latin", "empty",
        "no-letters"])
def test_language_of_says_zh_above_30_percent_ideographs_among_letters(text, lang):
    assert language_of(text) == lang


@pytest.mark.parametrize("kind", TYPES)
def test_training_sees_long_words_cut_at_the_cap_and_encoding_does_not(kind, monkeypatch):
    """A run without spaces (a CJK line without punctuation, a base64 blob) is one pre-tokenized word;
    the trainers cost grows with the longest word, so training gets it in pieces of MAX_TRAIN_WORD.
    Shorter words stay whole, and the saved tokenizer pre-tokenizes as it always did."""
    import lmforge.tokenizer

    pre = build(kind)[0].pre_tokenizer
    text = "a few short words, then " + "abcdefghij" * 3 + " and 中文中文中文"
    whole = [w for w, _ in pre.pre_tokenize_str(text)]
    assert [w for w, _ in capped(pre, 8).pre_tokenize_str(text)] == [
        w[i:i + 8] for w in whole for i in range(0, len(w), 8)]
    longest = max(map(len, whole))  # a word exactly as long as the cap stays whole
    assert [w for w, _ in capped(pre, longest).pre_tokenize_str(text)] == whole

    monkeypatch.setattr(lmforge.tokenizer, "MAX_TRAIN_WORD", 8)
    rng = random.Random(0)
    docs = ["".join(rng.choice(ZH) for _ in range(5)) for _ in range(100)]  # one Unigram word each
    tok = train(kind, docs + ["the alphabet abcdefghijklmnopqrstuvwxyz"] * 50, vocab_size=400, extra_ids=0)
    specials = {t.content for t in tok.inner.get_added_tokens_decoder().values()}
    pieces = [t.removeprefix("##") for t in tok.inner.get_vocab() if t not in specials]
    assert max(map(len, pieces)) <= 8  # uncut: 16 (Unigram's longest), 26 (WordPiece), 39 (BPE)
    saved, built = (json.loads(t.to_str())["pre_tokenizer"] for t in (tok.inner, build(kind)[0]))
    assert saved == built


def test_cli_trains_unigram_on_a_long_line_without_spaces(tmp_path):
    """`tokenizers` segfaults training Unigram on a word of ~65,000+ characters (a CJK line without
    spaces or punctuation is one word to its Metaspace pre-tokenizer). In a child process, so that a
    crash fails this test rather than killing the test run."""
    line = "".join(map(chr, random.Random(0).choices(range(0x4E00, 0x4E00 + 3000), k=100_000)))
    data = tmp_path / "long.txt"
    data.write_text("a few normal words.\n" * 5 + line + "\n", encoding="utf-8")
    args = ["tokenizer", "train", "--type", "unigram", "--data", str(data), "--vocab-size", "4000",
            "--out", str(tmp_path / "tok")]
    run = subprocess.run([sys.executable, "-m", "lmforge", *args], capture_output=True, text=True, timeout=99)
    assert run.returncode == 0, (run.returncode, run.stderr[-2000:])
    tok = Tokenizer.load(tmp_path / "tok")
    assert tok.decode(tok.encode(line)) == line


def test_is_cjk_covers_kana_and_hangul():
    from lmforge.tokenizer_cli import is_cjk

    assert [is_cjk(c) for c in "中あア한a1"] == [True, True, True, True, False, False]


def test_stats_counts_words_split_by_any_whitespace(toks):
    tok, _ = toks["bpe"]
    doc = "the cat\nsat  on\tthe mat\n"
    assert stats(tok, [doc])["other"]["words"] == 6
