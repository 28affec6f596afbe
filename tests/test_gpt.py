"""GPT invariants (cache == recompute, padding, causality), store round-trip + errors, presets, info."""

import json
from pathlib import Path

import pytest
import torch

from lmforge.config import CONFIG_DIR, ModelConfig, load_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.models.gpt import GPT
from lmforge.models.store import load_model, save_model

GPT2 = dict(vocab_size=97, max_seq_len=32, n_layer=2, n_head=4, d_model=32)
LLAMA = dict(GPT2, n_kv_head=2, d_ff=48, pos="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu",
             bias=False, tie_embeddings=False)


def _model(flavour: dict, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig(**{**flavour, **kw})).eval()


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_kv_cache_equals_full_recompute(flavour):
    m = _model(flavour)
    x = torch.randint(0, 97, (2, 12))
    full = m(x)
    cache = m.make_cache(2)
    parts = [m(x[:, :5], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(5, 9)]
    parts.append(m(x[:, 9:], cache=cache))  # a multi-token chunk after a cached prefix
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)
    last = m(x, last_only=True)
    torch.testing.assert_close(last, full[:, -1:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_left_padding_matches_unpadded(flavour, impl):
    m = _model(flavour, attn_impl=impl)
    x = torch.randint(1, 97, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x], 1)
    am = torch.tensor([[0, 0, 0] + [1] * 6])
    pos = (am.cumsum(-1) - 1).clamp(min=0)
    out = m(padded, attention_mask=am, position_ids=pos)
    torch.testing.assert_close(out[:, 3:], m(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_causal(flavour):
    """Changing a future token never changes earlier logits."""
    m = _model(flavour)
    x = torch.randint(0, 97, (1, 10))
    y = x.clone()
    y[0, 7] = (y[0, 7] + 1) % 97
    a, b = m(x), m(y)
    torch.testing.assert_close(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


def test_tied_and_untied_and_init():
    m = _model(GPT2)
    assert m.head.weight is m.tok_emb.weight
    assert m.num_params() == sum(p.numel() for p in m.parameters())
    n_res = m.blocks[0].attn.o.weight.std().item()
    assert n_res == pytest.approx(0.02 / 2, rel=0.2)  # 0.02 / sqrt(2 * n_layer)
    u = _model(LLAMA)
    assert u.head.weight is not u.tok_emb.weight
    assert u.blocks[0].attn.qkv.bias is None and u.blocks[0].mlp.fc.bias is None


def test_too_long_is_a_clear_error():
    m = _model(GPT2)
    with pytest.raises(ConfigError, match="33 tokens.*max_seq_len=32"):
        m(torch.zeros(1, 33, dtype=torch.long))


def test_gradient_checkpointing_same_grads():
    m = _model(LLAMA)
    m.train()
    x = torch.randint(0, 97, (2, 8))
    m(x).sum().backward()
    g1 = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    m.gradient_checkpointing = True
    m(x).sum().backward()
    for a, p in zip(g1, m.parameters()):
        torch.testing.assert_close(a, p.grad)


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_store_round_trip(tmp_path, flavour):
    m = _model(flavour)
    save_model(m, tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["n_layer"] == 2 and cfg["family"] == "gpt"
    m2 = load_model(tmp_path / "run")
    x = torch.randint(0, 97, (1, 7))
    torch.testing.assert_close(m2(x), m(x))
    assert (m2.head.weight is m2.tok_emb.weight) == m.cfg.tie_embeddings
    assert load_model(tmp_path / "run", dtype=torch.bfloat16).tok_emb.weight.dtype == torch.bfloat16


def _saved(tmp_path: Path) -> Path:
    save_model(_model(GPT2), tmp_path / "run")
    return tmp_path / "run"


def _rewrite_tensors(run: Path, fn) -> None:
    from safetensors.torch import load_file, save_file
    t = load_file(run / "model.safetensors")
    fn(t)
    save_file(t, run / "model.safetensors")


@pytest.mark.parametrize("case,match", [
    ("no_dir", "nope does not exist; give a run dir"),
    ("no_config", "config.json is missing"),
    ("no_weights", "model.safetensors is missing"),
    ("unknown_key", "unknown config key 'model.n_layers'"),
    ("corrupt", "not a readable safetensors"),
    ("missing", "lacks tensor 'ln_f.bias'"),
    ("unexpected", "unexpected tensor 'extra.weight'"),
    ("shape", "tensor 'pos_emb.weight' has shape"),
    ("huge_config", r"describes a model of at least [\d,]+ weights but .* holds"),  # no allocating
    ("huge_rope", "describes a model that cannot be built here"),
])
def test_store_errors(tmp_path, case, match):
    run = _saved(tmp_path)
    if case == "no_dir":
        run = tmp_path / "nope"
    elif case == "no_config":
        (run / "config.json").unlink()
    elif case == "no_weights":
        (run / "model.safetensors").unlink()
    elif case == "unknown_key":
        cfg = json.loads((run / "config.json").read_text())
        cfg["n_layers"] = 3
        (run / "config.json").write_text(json.dumps(cfg))
    elif case == "corrupt":
        data = (run / "model.safetensors").read_bytes()
        (run / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "missing":
        _rewrite_tensors(run, lambda t: t.pop("ln_f.bias"))
    elif case == "unexpected":
        _rewrite_tensors(run, lambda t: t.__setitem__("extra.weight", torch.zeros(2)))
    elif case == "shape":
        _rewrite_tensors(run, lambda t: t.__setitem__("pos_emb.weight", torch.zeros(16, 32)))
    elif case in ("huge_config", "huge_rope"):  # an edited config.json: 1e9 layers / RoPE tables of 1e15 rows
        cfg = json.loads((run / "config.json").read_text())
        cfg.update(n_layer=10**9) if case == "huge_config" else cfg.update(pos="rope", max_seq_len=10**15)
        (run / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=match):
        load_model(run)


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_loads_and_builds(path):
    import importlib.util

    from lmforge.models.store import FAMILIES, build_model
    cfg = load_config(str(path))
    if importlib.util.find_spec(FAMILIES[cfg.model.family].split(":")[0]) is None:
        pytest.skip(f"family {cfg.model.family} has no model module yet")
    with torch.device("meta"):  # shapes only: no memory, no init time
        m = build_model(cfg.model)
    assert sum(p.numel() for p in m.parameters()) > 0


def test_info_gpt2_124m():
    from lmforge.models.info import model_info
    info = model_info(load_config("gpt2-124m"))
    assert info["params"] == 124_439_808  # HF GPT2LMHeadModel unique params (tied head)
    assert info["params_non_embedding"] == 85_056_000
    n, L, T, d = 85_056_000 + 50_257 * 768, 12, 1024, 768  # + the tied head's matmul (nanoGPT's N)
    assert info["flops_per_token"] == 6 * n + 12 * L * T * d
    assert info["memory"]["fp32"]["weights"] == 124_439_808 * 4
    assert info["memory"]["fp32"]["adamw"] == 2 * 124_439_808 * 4


@pytest.mark.parametrize("preset, over", [
    ("gpt-tiny", {}), ("llama-small", {}), ("bert-tiny", {}),
    ("bert-tiny", {"train": {"objective": "mlm"}}),  # the objective drops the pooler and NSP head
    ("bert-tiny", {"model": {"heads": "none"}, "train": {"objective": "mlm"}}),  # ... or adds an mlm head
])
def test_info_flops_are_the_ones_the_trainer_reports_mfu_with(preset, over, tmp_path):
    from lmforge.models.info import model_info
    from lmforge.objectives import make_objective
    from lmforge.train.trainer import Trainer

    train = {"out_dir": str(tmp_path), "device": "cpu", **over.get("train", {})}
    cfg = load_config(preset, {**over, "train": train})
    obj = make_objective(cfg, None)
    model = obj.build_model()
    trainer = Trainer(cfg, model, obj, progress=False)
    info = model_info(cfg)
    assert trainer.flops_per_token == info["flops_per_token"]
    assert info["params"] == sum(p.numel() for p in model.parameters())  # the model the objective trains
    m = cfg.model  # N: an untied head is already among the non-embedding weights, a tied one is added
    head = m.vocab_size * m.d_model if m.tie_embeddings else 0
    assert info["params_matmul"] == info["params_non_embedding"] + head


@pytest.mark.parametrize("preset", ["gpt-tiny", "llama-small", "bert-tiny"])
def test_info_counts_any_depth_without_building_it(preset):
    from lmforge.models.info import model_info
    from lmforge.objectives import make_objective

    def built(n_layer):  # the real model, every layer of it (on meta: shapes only)
        cfg = load_config(preset, {"model": {"n_layer": n_layer}})
        with torch.device("meta"):
            return sum(p.numel() for p in make_objective(cfg, None).build_model().parameters())

    assert model_info(load_config(preset, {"model": {"n_layer": 5}}))["params"] == built(5)
    huge = model_info(load_config(preset, {"model": {"n_layer": 10**9}}))  # at once: nothing is built
    assert huge["params"] == built(3) + (10**9 - 3) * (built(4) - built(3))


def test_info_cli(capsys):
    from lmforge.cli import main
    from lmforge.models.info import model_info
    assert main(["model", "info", "gpt2-124m", "--model.n_layer=2"]) == 0
    out = capsys.readouterr().out
    assert "6N + 12" in out and "non-embedding" in out
    params = model_info(load_config("gpt2-124m", {"model": {"n_layer": 2}}))["params"]  # the override counts
    assert " n_layer=2 " in out and f"params     {params:,} total" in out
    assert main(["model", "info", "no-such-preset"]) == 2


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_init_sets_every_norm_to_one_and_every_bias_to_zero(flavour):
    """GPT-2 init: norms (ln1, ln2 and the final ln_f) start as the identity, biases at zero."""
    m = _model(flavour)
    norms = [(n, p) for n, p in m.named_parameters() if ".ln" in n or n.startswith("ln_f")]
    assert any(n.startswith("ln_f") for n, _ in norms)
    for name, p in norms:
        assert torch.equal(p, torch.ones_like(p) if name.endswith("weight") else torch.zeros_like(p)), name
    for name, p in m.named_parameters():
        if name.endswith("bias"):
            assert not p.any(), name


def test_num_params_non_embedding_by_hand():
    """GPT2 dict: per layer ln1 2d + qkv 3d^2+3d + o d^2+d + ln2 2d + fc 4d^2+4d + proj 4d^2+d = 12d^2 + 13d,
    plus ln_f 2d; embeddings V d + T d; the tied head adds nothing."""
    m = _model(GPT2)
    d, L, V, T = 32, 2, 97, 32
    non_emb = L * (12 * d * d + 13 * d) + 2 * d
    assert m.num_params(non_embedding=True) == non_emb
    assert m.num_params() == non_emb + V * d + T * d
    u = _model(LLAMA)  # rope: no position table to leave out; the untied head is not an embedding
    emb = 97 * 32
    assert u.num_params(non_embedding=True) == u.num_params() - emb


def test_left_padded_cached_decoding_matches_unpadded_recompute():
    """RoPE reads position_ids: a left-padded prompt, prefilled into a cache and then decoded one token at
    its own position, gives the logits of the same tokens run unpadded in one pass."""
    m = _model(LLAMA)
    x = torch.randint(1, 97, (1, 7))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), x[:, :6]], 1)
    am = torch.tensor([[0, 0, 0] + [1] * 7])
    cache = m.make_cache(1, 10)
    with torch.no_grad():
        m(padded, attention_mask=am[:, :9], position_ids=torch.tensor([[0, 0, 0, 0, 1, 2, 3, 4, 5]]),
          cache=cache)
        step = m(x[:, 6:], attention_mask=am, position_ids=torch.tensor([[6]]), cache=cache)
        full = m(x)
    torch.testing.assert_close(step[:, -1], full[:, -1], atol=1e-5, rtol=1e-5)


def test_info_memory_and_step_flops_by_hand():
    """gpt2-124m trained at T=512, micro-batch 4, 3 accumulation steps. Activations (Korthikanti et al.
    2022, eq. 1): L * B * T * (34 d + 5 h T) bytes in 16-bit, twice that in fp32, plus fp32 logits
    B * T * V * 4; FLOPs per step = per token x B x T x grad_accum."""
    from lmforge.models.info import model_info
    info = model_info(load_config("gpt2-124m", ["--data.seq_len=512", "--train.batch_size=4",
                                                "--train.grad_accum=3"]))
    L, B, T, d, h, V = 12, 4, 512, 768, 12, 50_257
    act16 = L * B * T * (34 * d + 5 * h * T)
    logits = B * T * V * 4
    assert info["seq_len"] == T and info["params"] == 124_439_808
    assert info["memory"]["fp32"]["activations"] == 2 * act16 + logits
    assert info["memory"]["bf16"]["activations"] == act16 + logits
    w = 124_439_808 * 4
    assert info["memory"]["bf16"]["total"] == w + w + 2 * w + act16 + logits
    per_token = 6 * (85_056_000 + V * d) + 12 * L * T * d
    assert info["flops_per_token"] == per_token and info["flops_per_step"] == per_token * B * T * 3


def test_position_ids_past_the_context_are_a_clear_error():
    """Explicit position_ids (left-padded generation) are checked too: the last position is max_seq_len - 1;
    one more is the ConfigError, not an IndexError from the position table."""
    for flavour in (GPT2, LLAMA):
        m = _model(flavour)
        ids = torch.tensor([[5, 6]])
        with torch.no_grad():
            assert m(ids, position_ids=torch.tensor([[30, 31]])).shape == (1, 2, 97)
        with pytest.raises(ConfigError, match="33 tokens.*max_seq_len=32"):
            m(ids, position_ids=torch.tensor([[31, 32]]))


@pytest.mark.parametrize("flavour", [GPT2, LLAMA], ids=["gpt2", "llama"])
def test_dropout_model_in_eval_mode_gives_the_dropout_free_logits(flavour):
    """Embedding, attention, MLP and residual dropout are all off after .eval()."""
    m = _model(flavour, dropout=0.3)
    ref = _model(flavour)
    ref.load_state_dict(m.state_dict())
    x = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m(x), ref(x))
        assert not torch.allclose(m.train()(x), ref(x))


def test_the_checkpointing_switch_leaves_eval_mode_cached_decoding_alone():
    """A model trained with activation checkpointing keeps gradient_checkpointing=True; in eval mode the
    KV cache must still be filled (checkpointed blocks are called without it)."""
    m = _model(LLAMA)
    m.gradient_checkpointing = True
    x = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        full = m(x)
        cache = m.make_cache(2)
        parts = [m(x[:, :5], cache=cache)] + [m(x[:, t:t + 1], cache=cache) for t in range(5, 8)]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


def test_init_std_of_every_weight_matrix():
    """N(0, 0.02) everywhere, and 0.02 / sqrt(2 n_layer) for both residual projections (attn.o, mlp.proj)."""
    m = _model(GPT2, d_model=64, n_layer=4)
    small = 0.02 / (2 * 4) ** 0.5
    for name, p in m.named_parameters():
        if p.dim() < 2:
            continue
        want = small if name.endswith(("attn.o.weight", "mlp.proj.weight")) else 0.02
        assert p.std().item() == pytest.approx(want, rel=0.1), name
        assert abs(p.mean().item()) < 0.1 * want, name
