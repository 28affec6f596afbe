"""fill-mask and embed equal Hugging Face (fill-mask pipeline, mean/CLS pooling) and work from the CLI."""

import gzip
import json

import numpy as np
import pytest
import torch
from test_bert import hf_config, hf_to_ours

from lmforge.cli import main
from lmforge.config import ModelConfig
from lmforge.inference import embed, fill_mask, load_encoder
from lmforge.models.bert import BertForPreTraining
from lmforge.models.store import save_model

transformers = pytest.importorskip("transformers")

TEXTS = ["the cat sat on the mat.", "dogs were running around gardens!", "people talk about weather",
         "a cat and a dog", "tomorrow the weather will be unbelievable, people said"]


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from lmforge.tokenizer import train

    return train("wordpiece", TEXTS * 20, vocab_size=90, min_frequency=1)


def make_pair(tok, heads: str, seed: int = 0):
    """(ours, hf) with the same random weights; heads mlm -> BertForMaskedLM, none -> BertModel.

    max_seq_len has room to spare: WordPiece training breaks count ties in hash-map order
    (huggingface/tokenizers#1794), so TEXTS' token counts vary a little from run to run.
    """
    cfg = ModelConfig(family="bert", vocab_size=tok.vocab_size, max_seq_len=64, n_layer=2, n_head=2,
                      d_model=32, d_ff=64, norm_eps=1e-12, norm_position="post", mlp="gelu", heads=heads)
    torch.manual_seed(seed)
    hf_cls = transformers.BertForMaskedLM if heads == "mlm" else transformers.BertModel
    hf = hf_cls(hf_config(cfg)).eval()
    ours = BertForPreTraining(cfg).eval()
    ours.load_state_dict(hf_to_ours(hf.state_dict()))
    return ours, hf


def hf_tokenizer(tok):
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok.inner, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
        sep_token="[SEP]", mask_token="[MASK]")


def test_fill_mask_matches_hf_pipeline(tok):
    ours, hf = make_pair(tok, "mlm")
    text = "the [MASK] sat on the [MASK]."
    pipe = transformers.pipeline("fill-mask", model=hf, tokenizer=hf_tokenizer(tok), device="cpu", top_k=4)
    ref = pipe(text)  # a list per [MASK]
    got = fill_mask(ours, tok, text, top_k=4)
    assert len(got) == len(ref) == 2
    for g, r in zip(got, ref):
        assert [c["id"] for c in g] == [c["token"] for c in r]
        np.testing.assert_allclose([c["prob"] for c in g], [c["score"] for c in r], rtol=1e-4, atol=1e-6)
        assert abs(sum(c["prob"] for c in fill_mask(ours, tok, text, top_k=tok.vocab_size)[0]) - 1) < 1e-4


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_embed_matches_hf_pooling(tok, pooling):
    ours, hf = make_pair(tok, "none", seed=1)
    enc = hf_tokenizer(tok)(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        h = hf(**enc).last_hidden_state  # (N, T, C)
    m = enc["attention_mask"][..., None].float()
    ref = (h * m).sum(1) / m.sum(1) if pooling == "mean" else h[:, 0]
    got = embed(ours, tok, TEXTS, pooling=pooling, batch_size=2)  # batches of 2: padding differs per batch
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)
    normed = embed(ours, tok, TEXTS, pooling=pooling, normalize=True)
    np.testing.assert_allclose(np.linalg.norm(normed, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(normed, ref.numpy() / np.linalg.norm(ref.numpy(), axis=1, keepdims=True),
                               rtol=1e-4, atol=1e-5)
    # the tokenizer's own outputs can be fed straight in, HF style
    with torch.no_grad():
        out = ours(**{k: v for k, v in enc.items()})
    torch.testing.assert_close(out.pooler_output, hf(**enc).pooler_output, atol=1e-5, rtol=1e-4)


@pytest.fixture(scope="module")
def runs(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    for heads in ("mlm", "none"):
        model, _ = make_pair(tok, heads)
        save_model(model, root / heads)
        tok.save(root / heads)
    return root


def test_cli_fill_mask(runs, tok, capsys):
    assert main(["fill-mask", str(runs / "mlm"), "the cat [MASK] on the mat.", "--top-k", "3", "--json"]) == 0
    preds = json.loads(capsys.readouterr().out)
    model, _ = load_encoder(runs / "mlm")
    assert preds == json.loads(json.dumps(fill_mask(model, tok, "the cat [MASK] on the mat.", 3)))
    assert main(["fill-mask", str(runs / "mlm"), "no mask here"]) == 2
    assert "no [MASK]" in capsys.readouterr().err
    long = "the cat sat on the mat. " * 20 + "[MASK]"  # > max_seq_len=64 tokens before the [MASK]
    assert main(["fill-mask", str(runs / "mlm"), long]) == 2
    err = capsys.readouterr().err
    assert "falls after the first max_seq_len=64 tokens" in err and "no [MASK]" not in err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert main(["fill-mask", str(runs / "none"), "the [MASK]."]) == 2  # a backbone has no MLM head
    assert "no MLM head" in capsys.readouterr().err


def test_cli_embed_npy_and_jsonl(runs, tok, tmp_path, capsys):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS[:3]) + "\n\n")
    npy = tmp_path / "e.npy"
    assert main(["embed", str(runs / "none"), "--input", str(src), "--output", str(npy), "--normalize"]) == 0
    arr = np.load(npy)
    model, _ = load_encoder(runs / "none")
    np.testing.assert_allclose(arr, embed(model, tok, TEXTS[:3], normalize=True), rtol=1e-6)
    jl = tmp_path / "in.jsonl"
    jl.write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS[:2]))
    out = tmp_path / "e.jsonl"
    assert main(["embed", str(runs / "mlm"), "--input", str(jl), "--text-field", "body", "--pooling", "cls",
                 "--output", str(out)]) == 0
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [r["text"] for r in recs] == TEXTS[:2] and len(recs[0]["embedding"]) == 32
    capsys.readouterr()
    assert main(["embed", str(runs / "none"), "--input", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "d.npy").mkdir()  # a folder where the output file should go: named as given
    assert main(["embed", str(runs / "none"), "--input", str(jl), "--text-field", "body",
                 "--output", str(tmp_path / "d.npy")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {tmp_path / 'd.npy'} is a folder") and err.count("\n") == 1, err


def test_a_gpt_run_is_refused(tok, tmp_path, capsys):
    from lmforge.config import load_config
    from lmforge.models.gpt import GPT

    save_model(GPT(load_config("gpt-tiny").model), tmp_path / "gpt")
    tok.save(tmp_path / "gpt")
    (tmp_path / "in.txt").write_text("a cat\n")
    assert main(["embed", str(tmp_path / "gpt"), "--input", str(tmp_path / "in.txt")]) == 2
    assert "need an encoder" in capsys.readouterr().err


def test_fill_mask_never_offers_ids_past_the_tokenizer(tok, tmp_path, capsys):
    """A model vocab padded past the tokenizer (as HF checkpoints often are): those rows spell no token."""
    cfg = ModelConfig(family="bert", vocab_size=tok.vocab_size + 30, max_seq_len=64, n_layer=1, n_head=2,
                      d_model=32, d_ff=64, heads="mlm")
    model = BertForPreTraining(cfg).eval()
    with torch.no_grad():
        model.mlm.bias[tok.vocab_size:] = 100.0  # the padding rows would win every top-k
    save_model(model, tmp_path / "padded")
    tok.save(tmp_path / "padded")
    got = fill_mask(model, tok, "the [MASK] sat.", top_k=tok.vocab_size + 10)[0]
    assert len(got) == tok.vocab_size and all(c["id"] < tok.vocab_size and c["token"] for c in got)
    assert abs(sum(c["prob"] for c in got) - 1) < 1e-4
    assert main(["fill-mask", str(tmp_path / "padded"), "the [MASK] sat.", "--top-k", "2"]) == 0
    assert capsys.readouterr().out.count("\n") == 3


def test_fill_mask_refuses_when_truncation_cuts_one_of_several_masks(runs, capsys):
    text = "the [MASK] sat. " + "the cat sat on the mat. " * 20 + "[MASK]"
    assert main(["fill-mask", str(runs / "mlm"), text]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: a [MASK] falls after the first max_seq_len=64") and err.count("\n") == 1


def test_embed_input_that_is_not_utf8_or_is_a_folder(runs, tmp_path, capsys):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    for src, message in [(tmp_path / "latin1.txt", "is not UTF-8 text (byte 3)"),
                         (tmp_path, "is a folder, not a file")]:
        assert main(["embed", str(runs / "none"), "--input", str(src)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_embed_input_reads_csv_parquet_json_and_gz_like_data(runs, tmp_path, capsys):
    """--input takes what --data takes (lmforge.data.readers), one text per record; text stays per line."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    multi = "the cat sat,\non the mat."
    (tmp_path / "rev.csv").write_text(f'id,review\n1,"{multi}"\n2,a cat and a dog\n')
    pq.write_table(pa.table({"n": [1, 2], "body": [multi, "a cat and a dog"]}), tmp_path / "p.parquet")
    (tmp_path / "a.json").write_text(json.dumps([{"text": multi}, {"text": "a cat and a dog"}]))
    (tmp_path / "l.jsonl.gz").write_bytes(gzip.compress(
        "".join(json.dumps({"t": t}) + "\n" for t in (multi, "a cat and a dog")).encode()))
    (tmp_path / "c.txt.gz").write_bytes(gzip.compress(b"the cat sat,\n\non the mat.\n"))
    for name, extra, want in [("rev.csv", [], [multi, "a cat and a dog"]),
                              ("p.parquet", [], [multi, "a cat and a dog"]),
                              ("a.json", [], [multi, "a cat and a dog"]),
                              ("l.jsonl.gz", ["--text-field", "t"], [multi, "a cat and a dog"]),
                              ("c.txt.gz", [], ["the cat sat,", "on the mat."])]:
        out = tmp_path / f"{name}.out.jsonl"
        assert main(["embed", str(runs / "none"), "--input", str(tmp_path / name), *extra,
                     "--output", str(out)]) == 0, capsys.readouterr().err
        assert [json.loads(x)["text"] for x in out.read_text().splitlines()] == want, name
    # the readers' one-line errors, and --text-field where there are no fields
    (tmp_path / "two.csv").write_text("title,body\nT,B\n")
    (tmp_path / "in.txt").write_text("a cat\n")
    (tmp_path / "latin1.csv").write_bytes("text\ncaf\xe9\n".encode("latin-1"))
    for name, extra, message in [("two.csv", [], "no field 'text' (fields: title, body); pass --text-field"),
                                 ("in.txt", ["--text-field", "body"], "--text-field is for a .jsonl, .json"),
                                 ("latin1.csv", [], "latin1.csv is not UTF-8 (1 bad bytes)")]:
        capsys.readouterr()
        assert main(["embed", str(runs / "none"), "--input", str(tmp_path / name), *extra]) == 2
        out, err = capsys.readouterr()
        assert out == "" and err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_an_hf_folder_without_tokenizer_is_one_line(tok, tmp_path, capsys):
    _, hf = make_pair(tok, "mlm")
    hf.save_pretrained(tmp_path / "hf")  # weights + config.json, no tokenizer files
    (tmp_path / "in.txt").write_text("a cat\n")
    capsys.readouterr()  # save_pretrained's progress bar
    for argv in (["fill-mask", str(tmp_path / "hf"), "the [MASK]."],
                 ["embed", str(tmp_path / "hf"), "--input", str(tmp_path / "in.txt")]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "has no tokenizer" in err and err.count("\n") == 1, err


def test_embed_truncates_a_text_longer_than_the_context_like_hf(tok):
    """[CLS] + the first max_seq_len - 2 tokens + [SEP], as HF's tokenizer(truncation=True) cuts it."""
    ours, hf = make_pair(tok, "none", seed=2)
    texts = [" ".join(TEXTS * 3), TEXTS[0]]
    enc = hf_tokenizer(tok)(texts, padding=True, truncation=True, max_length=64, return_tensors="pt")
    assert int(enc["attention_mask"][0].sum()) == 64  # the first text was cut
    with torch.no_grad():
        h = hf(**enc).last_hidden_state
    m = enc["attention_mask"][..., None].float()
    for pooling, ref in (("mean", (h * m).sum(1) / m.sum(1)), ("cls", h[:, 0])):
        got = embed(ours, tok, texts, pooling=pooling)
        np.testing.assert_allclose(got, ref.numpy(), rtol=1e-4, atol=1e-5)


def test_cli_fill_mask_lists_the_default_top_5_per_mask(runs, tok, capsys):
    text = "the cat [MASK] on the [MASK]."
    assert main(["fill-mask", str(runs / "mlm"), text]) == 0
    lines = capsys.readouterr().out.splitlines()
    model, _ = load_encoder(runs / "mlm")
    preds = fill_mask(model, tok, text, top_k=5)  # --help: default 5
    assert len(lines) == 2 * (1 + 5)
    for n, cands in enumerate(preds):
        block = lines[n * 6: n * 6 + 6]
        assert block[0] == f"[MASK] {n + 1}:"
        for line, c in zip(block[1:], cands, strict=True):
            token, prob = line.split()
            assert token == c["token"] and float(prob) == pytest.approx(c["prob"], abs=5e-5)


def test_cli_embed_writes_jsonl_to_stdout_with_the_pooling_asked(runs, tok, tmp_path, capsys, monkeypatch):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS[:3]) + "\n")
    assert main(["embed", str(runs / "mlm"), "--input", str(src), "--pooling", "cls"]) == 0
    recs = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    model, _ = load_encoder(runs / "mlm")
    ref = embed(model, tok, TEXTS[:3], pooling="cls")
    assert not np.allclose(ref, embed(model, tok, TEXTS[:3], pooling="mean"), atol=1e-3)
    assert [r["text"] for r in recs] == TEXTS[:3]
    np.testing.assert_allclose(np.array([r["embedding"] for r in recs]), ref, rtol=1e-5, atol=1e-6)
    # an --output that is neither .npy nor .jsonl: one line, nothing written
    assert main(["embed", str(runs / "mlm"), "--input", str(src), "--output", str(tmp_path / "e.txt")]) == 2
    err = capsys.readouterr().err
    assert err == f"error: --output {tmp_path / 'e.txt'} must end in .npy or .jsonl\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
    # --device reaches the loader: CUDA asked for on a machine without it names the flag
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for argv in (["fill-mask", str(runs / "mlm"), "the [MASK]."], ["embed", str(runs / "mlm"), "--input",
                                                                     str(src)]):
        assert main([*argv, "--device", "cuda"]) == 2
        err = capsys.readouterr().err
        assert "CUDA is not available; use --device=cpu" in err and err.count("\n") == 1, err


def test_embed_output_that_is_the_input_file_is_refused_and_the_input_kept(runs, tmp_path, capsys):
    src = tmp_path / "texts.jsonl"
    src.write_text('{"text": "a cat"}\n{"text": "a dog"}\n')
    before = src.read_bytes()
    assert main(["embed", str(runs / "none"), "--input", str(src), "--output", str(src)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --output {src} is the --input file;") and err.count("\n") == 1, err
    assert src.read_bytes() == before
