"""Shared layers agree with outside references: SDPA vs explicit math, RoPE vs hand rotation, norms."""

import math

import pytest
import torch
import torch.nn.functional as F

from lmforge.config import ModelConfig
from lmforge.models.layers import (
    MLP,
    Attention,
    KVCache,
    LayerNorm,
    RMSNorm,
    apply_rope,
    build_attn_mask,
    rope_cache,
)


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=50, max_seq_len=32, n_layer=1, n_head=4, d_model=32, bias=True)
    base.update(kw)
    return ModelConfig(**base)


def _pair(cfg: ModelConfig, causal: bool):
    torch.manual_seed(0)
    a = Attention(cfg, causal=causal).eval()
    b = Attention(ModelConfig(**{**cfg.__dict__, "attn_impl": "math"}), causal=causal).eval()
    b.load_state_dict(a.state_dict())
    return a, b


@pytest.mark.parametrize("n_kv_head", [None, 2, 1])
@pytest.mark.parametrize("causal", [True, False])
def test_sdpa_equals_math(n_kv_head, causal):
    cfg = _cfg(n_kv_head=n_kv_head)
    sdpa, math_ = _pair(cfg, causal)
    x = torch.randn(3, 7, 32)
    torch.testing.assert_close(sdpa(x), math_(x), atol=1e-5, rtol=1e-5)
    # with left padding: rows have 7, 4 and 1 real tokens
    am = torch.tensor([[1] * 7, [0] * 3 + [1] * 4, [0] * 6 + [1]])
    mask = build_attn_mask(am, 7, 7, causal=causal)
    torch.testing.assert_close(sdpa(x, mask=mask), math_(x, mask=mask), atol=1e-5, rtol=1e-5)


def test_math_attention_is_the_formula():
    """Single head, no GQA: compare with softmax(QK^T/sqrt(d)) V written out with a literal causal mask."""
    cfg = _cfg(n_head=1, d_model=8, bias=False, attn_impl="math")
    torch.manual_seed(1)
    att = Attention(cfg, causal=True)
    x = torch.randn(1, 3, 8)
    q, k, v = (x @ att.qkv.weight.T).split(8, dim=-1)
    allowed = torch.tensor([[1, 0, 0], [1, 1, 0], [1, 1, 1]], dtype=torch.bool)
    s = (q @ k.transpose(-1, -2) / math.sqrt(8)).masked_fill(~allowed, float("-inf"))
    ref = (s.softmax(-1) @ v) @ att.o.weight.T
    torch.testing.assert_close(att(x), ref)


def test_padding_mask_literal():
    """Left padding + causal, written as a 0/1 matrix; a padding query sees only itself."""
    m = build_attn_mask(torch.tensor([[0, 1, 1]]), 3, 3, causal=True)[0, 0].int()
    assert m.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    # decoding one query at position 3 with a cache of 3: sees all real keys, not the pad
    m = build_attn_mask(torch.tensor([[0, 1, 1, 1]]), 1, 4, causal=True)[0, 0].int()
    assert m.tolist() == [[0, 1, 1, 1]]
    assert build_attn_mask(None, 5, 5, causal=True) is None
    assert build_attn_mask(None, 1, 5, causal=True) is None
    m = build_attn_mask(None, 2, 4, causal=True)[0, 0].int()
    assert m.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1]]


def test_padding_keys_do_not_matter():
    """A padded key's content must not change the outputs of real queries."""
    sdpa, _ = _pair(_cfg(), causal=False)
    x = torch.randn(1, 5, 32)
    am = torch.tensor([[0, 0, 1, 1, 1]])
    y1 = sdpa(x, mask=build_attn_mask(am, 5, 5, causal=False))
    x2 = x.clone()
    x2[:, :2] = torch.randn(1, 2, 32)
    y2 = sdpa(x2, mask=build_attn_mask(am, 5, 5, causal=False))
    torch.testing.assert_close(y1[:, 2:], y2[:, 2:])
    torch.testing.assert_close(y1[:, 2:], sdpa(x[:, 2:]))


def test_rope_hand_rotation():
    """head_dim 4, theta 100: channel pairs (0,2) rotate by pos*1, (1,3) by pos*0.1 (rotate-half)."""
    cos, sin = rope_cache(4, 3, theta=100.0)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 1, 4).expand(1, 1, 3, 4)
    out = apply_rope(x, cos, sin)[0, 0]
    for pos in range(3):
        expect = []
        for a, b, freq in [(1.0, 3.0, 1.0), (2.0, 4.0, 0.1)]:
            t = pos * freq
            expect.append((a * math.cos(t) - b * math.sin(t), a * math.sin(t) + b * math.cos(t)))
        row = [expect[0][0], expect[1][0], expect[0][1], expect[1][1]]
        torch.testing.assert_close(out[pos], torch.tensor(row))


def test_rope_relative():
    """<rope(q, m), rope(k, n)> depends only on m - n."""
    cos, sin = rope_cache(8, 16)
    q, k = torch.randn(8), torch.randn(8)
    def dot(m, n):
        qm = apply_rope(q.view(1, 1, 1, 8), cos[m:m + 1], sin[m:m + 1]).flatten()
        kn = apply_rope(k.view(1, 1, 1, 8), cos[n:n + 1], sin[n:n + 1]).flatten()
        return (qm @ kn).item()
    assert dot(5, 2) == pytest.approx(dot(13, 10), abs=1e-5)


def test_norms_match_references():
    x = torch.randn(2, 3, 16)
    ln = LayerNorm(16, 1e-5, bias=True)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    torch.testing.assert_close(ln(x), F.layer_norm(x, (16,), ln.weight, ln.bias, 1e-5))
    assert LayerNorm(16, bias=False).bias is None
    rms = RMSNorm(16, eps=1e-6)
    ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(rms(x), ref)
    assert rms.bfloat16()(x.bfloat16()).dtype == torch.bfloat16


def test_mlp_variants():
    x = torch.randn(2, 3, 8)
    m = MLP(_cfg(d_model=8, n_head=2, mlp="swiglu", d_ff=12, bias=False))
    gate, up = m.fc.weight[:12], m.fc.weight[12:]
    torch.testing.assert_close(m(x), (F.silu(x @ gate.T) * (x @ up.T)) @ m.proj.weight.T)
    m = MLP(_cfg(d_model=8, n_head=2, mlp="gelu"))
    h = x @ m.fc.weight.T + m.fc.bias
    ref = (0.5 * h * (1 + torch.erf(h / math.sqrt(2)))) @ m.proj.weight.T + m.proj.bias
    torch.testing.assert_close(m(x), ref)


def test_kv_cache_overflow():
    c = KVCache(1, 1, 1, 4, 2)
    c.update(0, torch.zeros(1, 1, 3, 2), torch.zeros(1, 1, 3, 2))
    c.advance(3)
    with pytest.raises(RuntimeError, match="holds 4"):
        c.update(0, torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))


@pytest.mark.parametrize("d_in", [64, 24, 40])  # the fused CPU kernel needs d_in % 16 == 0: else a fallback
def test_int8_linear_matches_dequantized_reference(d_in):
    from lmforge.models.layers import Int8Linear
    torch.manual_seed(0)
    lin = torch.nn.Linear(d_in, 48)
    q = Int8Linear(lin)
    x = torch.randn(2, 5, d_in)
    w = q.weight_int8.float() * q.scale.float()[:, None]  # dequantized (out, in)
    assert (w - lin.weight).abs().max() <= lin.weight.abs().max() / 127  # half a step of the largest scale
    ref = F.linear(x.bfloat16().float(), w, q.bias.float())
    torch.testing.assert_close(q(x).float(), ref, atol=3e-2, rtol=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_packed_linear_equals_linear(dtype, bias):
    from lmforge.models.layers import PackedLinear
    torch.manual_seed(0)
    lin = torch.nn.Linear(48, 40, bias=bias).to(dtype)
    packed = PackedLinear(lin)
    for x in (torch.randn(1, 48), torch.randn(3, 5, 48)):  # a decoding row; a (B, T, C) prefill
        x = x.to(dtype)
        with torch.no_grad():
            want = lin(x)
        got = packed(x)
        assert got.shape == want.shape and got.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 1e-2  # fp32: another summation order
        torch.testing.assert_close(got, want, atol=tol, rtol=0)
    assert not list(packed.parameters())  # inference only: nothing to train or save


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_make_norm_uses_the_configured_eps(norm):
    """model.norm_eps reaches the norm: with eps 0.5 (far from any default) compare with the formula."""
    from lmforge.models.layers import make_norm

    x = torch.randn(2, 3, 16) * 0.3  # mean square ~0.09: eps 0.5 dominates, a default eps would not
    got = make_norm(_cfg(d_model=16, n_head=2, norm=norm, norm_eps=0.5, bias=False))(x)
    if norm == "rmsnorm":
        ref = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 0.5)
    else:
        c = x - x.mean(-1, keepdim=True)
        ref = c / torch.sqrt(c.pow(2).mean(-1, keepdim=True) + 0.5)
    torch.testing.assert_close(got, ref)


def test_kv_cache_can_be_filled_to_its_last_slot():
    """A cache of 4 positions takes 3 + 1 = 4 writes and hands back exactly what was written."""
    c = KVCache(1, 1, 1, 4, 2)
    k1, k2 = torch.randn(1, 1, 3, 2), torch.randn(1, 1, 1, 2)
    c.update(0, k1, k1)
    c.advance(3)
    k, v = c.update(0, k2, -k2)
    assert k.shape == (1, 1, 4, 2)
    torch.testing.assert_close(k, torch.cat([k1, k2], 2))
    torch.testing.assert_close(v, torch.cat([k1, -k2], 2))


def test_causal_bias_aligns_queries_to_the_last_positions():
    """Two queries at positions 1, 2 of three keys: query 1 may not see key 2; query 2 sees all."""
    from lmforge.models.layers import causal_bias

    inf, cpu = float("-inf"), torch.device("cpu")
    assert causal_bias(2, 3, torch.float32, cpu).tolist() == [[0.0, 0.0, inf], [0.0, 0.0, 0.0]]
    square = [[0.0, inf, inf], [0.0, 0.0, inf], [0.0, 0.0, 0.0]]
    assert causal_bias(3, 3, torch.float32, cpu).tolist() == square


def test_rmsnorm_in_bf16_is_bitwise_transformers_llama_rmsnorm():
    """bf16 input: mean square and rsqrt in fp32, cast back, then the gain (HF's LlamaRMSNorm order);
    the norm in bf16 itself, or the gain applied before the cast, rounds differently."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    ours, ref = RMSNorm(64, eps=1e-6), LlamaRMSNorm(64, eps=1e-6)
    with torch.no_grad():
        ours.weight.copy_(torch.randn(64))
        ref.weight.copy_(ours.weight)
    ours, ref = ours.bfloat16(), ref.bfloat16()
    x = (torch.randn(4, 16, 64) * 3).bfloat16()
    with torch.no_grad():
        got, want = ours(x), ref(x)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_attention_dropout_is_off_in_eval_mode(impl):
    """model.dropout > 0: eval mode gives the dropout-free output (deterministic); training mode drops."""
    torch.manual_seed(0)
    drop = Attention(_cfg(dropout=0.5, attn_impl=impl), causal=True)
    plain = Attention(_cfg(attn_impl=impl), causal=True)
    plain.load_state_dict(drop.state_dict())
    x = torch.randn(2, 6, 32)
    drop.eval()
    torch.testing.assert_close(drop(x), plain.eval()(x))
    drop.train()
    assert not torch.allclose(drop(x), plain(x))
