"""The only shared model code: norms, RoPE, attention, MLPs, the Transformer block and the KV cache.

Every family (gpt.py, bert.py) is assembled from these pieces, configured by `ModelConfig`:

    norm      LayerNorm (bias optional, GPT-2 / BERT) | RMSNorm (fp32 math then cast, Llama)
    pos       RoPE here (rotate-half convention, as HF Llama); learned tables live in the family
    Attention causal or bidirectional, optional padding mask, grouped-query (n_kv_head < n_head),
              attn_impl "sdpa" (F.scaled_dot_product_attention) or "math" (the explicit formula),
              KV-cache aware
    MLP       gelu (exact erf) | gelu_tanh | swiglu = proj(silu(gate(x)) * up(x))
    Block     pre-norm (x + f(norm(x))) or post-norm (norm(x + f(x)), original BERT)

Parameter names (stable; convert_names.py maps Hugging Face names onto them):
    attn.qkv   Linear(d_model -> (n_head + 2 * n_kv_head) * head_dim): rows are [q; k; v]
    attn.o     Linear(n_head * head_dim -> d_model)
    mlp.fc     Linear(d_model -> d_ff), or (d_model -> 2 * d_ff) for swiglu with rows [gate; up]
    mlp.proj   Linear(d_ff -> d_model)
    ln1, ln2   the two norms of a Block (before attn / mlp for pre-norm, after the residual for post)
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from lmforge import kernels
from lmforge.config import ModelConfig

# ---------------------------------------------------------------------------------------------
# norms


class LayerNorm(nn.Module):
    """LayerNorm with an optional bias (PyTorch's nn.LayerNorm always has one when affine)."""

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight, computed in fp32 and cast back (as HF LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)


# ---------------------------------------------------------------------------------------------
# rotary position embedding (Su et al. 2021, "RoFormer"), rotate-half convention


def rope_cache(head_dim: int, max_len: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin tables of shape (max_len, head_dim), fp32.

    Frequencies inv_freq[i] = theta^(-2i/head_dim) for i < head_dim/2; each is used twice
    (cat(freqs, freqs)) because rotate_half pairs channel i with channel i + head_dim/2.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    pos = torch.arange(max_len, dtype=torch.int64).float()
    freqs = torch.outer(pos, inv_freq)  # (max_len, head_dim/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (max_len, head_dim)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """[x1, x2] -> [-x2, x1] on the last dim. [1, 2, 3, 4] -> [-3, -4, 1, 2]"""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, nh, T, hs); cos, sin broadcastable to it, e.g. (1 or B, 1, T, hs)."""
    if cos.dtype != x.dtype:  # the model passes tables already in the compute dtype; this is a guard
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return x * cos + rotate_half(x) * sin


# ---------------------------------------------------------------------------------------------
# masks


def build_attn_mask(
    attention_mask: torch.Tensor | None, q_len: int, k_len: int, causal: bool,
    device: torch.device | None = None,
) -> torch.Tensor | None:
    """The boolean mask (B or 1, 1, q_len, k_len) that Attention takes (True = may attend), or None.

    attention_mask: (B, k_len) with 1 for real tokens and 0 for padding (keys), or None; device:
    where to build the mask when attention_mask is None (pass the input's device).
    The queries are the last q_len of the k_len positions (KV-cache decoding: k_len = past + q_len).
    Returns None when no mask is needed: bidirectional without padding, or causal without padding
    and q_len in (1, k_len) (Attention then uses is_causal / attends to everything).
    A query that would see no key at all (a padding position in a left-padded row) is allowed to
    see itself, so softmax never divides by zero; its output is garbage that nobody reads.

        >>> build_attn_mask(torch.tensor([[0, 1, 1]]), 3, 3, causal=True)[0, 0].int()
        tensor([[1, 0, 0],      # padding query: only itself
                [0, 1, 0],
                [0, 1, 1]])
    """
    if attention_mask is None and (not causal or q_len == 1 or q_len == k_len):
        return None
    device = attention_mask.device if attention_mask is not None else device  # the model's device
    q_pos = torch.arange(k_len - q_len, k_len, device=device)[:, None]  # (Tq, 1) absolute positions
    k_pos = torch.arange(k_len, device=device)[None, :]  # (1, Tk)
    mask = (k_pos <= q_pos) if causal else torch.ones(q_len, k_len, dtype=torch.bool, device=device)
    mask = mask[None, None]  # (1, 1, Tq, Tk)
    if attention_mask is not None:
        mask = mask & attention_mask.bool()[:, None, None, :]  # (B, 1, Tq, Tk)
        mask = mask | (k_pos == q_pos)[None, None]
    return mask


# ---------------------------------------------------------------------------------------------
# KV cache


class KVCache:
    """Preallocated keys / values for every layer: k, v (n_layer, B, n_kv, max_len, hs).

    `pos` is the number of positions already written (same for every row; left-padded batches
    keep their padding in the cache and hide it with the attention mask). A forward pass writes
    its T new positions at [pos, pos + T) in each layer, then the model calls `advance(T)`.
    """

    def __init__(self, n_layer: int, batch_size: int, n_kv: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layer, batch_size, n_kv, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.pos = 0

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv, T, hs) at [pos, pos + T); return all keys / values so far (views)."""
        end = self.pos + k.shape[2]
        if end > self.max_len:
            raise RuntimeError(f"KV cache holds {self.max_len} positions; cannot write up to {end}")
        self.k[layer, :, :, self.pos:end] = k
        self.v[layer, :, :, self.pos:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, n_kv, end, hs)

    def advance(self, n: int) -> None:
        self.pos += n

    def reset(self) -> None:
        self.pos = 0


class Linear(nn.Linear):
    """nn.Linear whose bias oneDNN adds inside the GEMM while training on a CPU in bf16
    (`kernels.linear`); the same parameters, state_dict and values as nn.Linear."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias)


# ---------------------------------------------------------------------------------------------
# attention


def causal_bias(q_len: int, k_len: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """(q_len, k_len) additive mask: 0 where key <= query (queries are the last q_len positions), else -inf.

        >>> causal_bias(2, 3, torch.float32, torch.device("cpu"))
        tensor([[0., 0., -inf],
                [0., 0., 0.]])
    """
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
    return torch.zeros(q_len, k_len, dtype=dtype, device=device).masked_fill(~allowed, float("-inf"))


_cached_causal_bias = functools.lru_cache(maxsize=16)(causal_bias)  # eager: built once per shape


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention: softmax(Q K^T / sqrt(d_k) + mask) V."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.n_head, self.n_kv, self.hs = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.causal = causal
        self.impl = cfg.attn_impl
        self.dropout = cfg.dropout
        self.qkv = Linear(cfg.d_model, (self.n_head + 2 * self.n_kv) * self.hs, bias=cfg.bias)
        self.o = Linear(self.n_head * self.hs, cfg.d_model, bias=cfg.bias)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None = None,
        mask: torch.Tensor | None = None,
        cache: KVCache | None = None,
        layer: int = 0,
    ) -> torch.Tensor:
        """x (B, T, C); rope = (cos, sin) broadcastable to (B, nh, T, hs); mask from build_attn_mask
        (bool, True = attend) or an additive float mask, broadcastable to (B, nh, T, T_total)."""
        B, T, _ = x.shape
        nh, nkv, hs = self.n_head, self.n_kv, self.hs
        qkv = self.qkv(x).view(B, T, nh + 2 * nkv, hs)
        q, k, v = qkv.transpose(1, 2).split([nh, nkv, nkv], dim=1)  # (B, nh|nkv, T, hs)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)  # (B, nkv, T_total, hs)
        # causal without an explicit mask: only a full square (no cached prefix) needs is_causal;
        # a single new query may see every cached key
        is_causal = self.causal and mask is None and T > 1
        dropout = self.dropout if self.training else 0.0
        # one new query against a KV cache (decoding): SDPA's kernel is ~2x faster than the math path
        # here whatever attn_impl says (the math choice pays off on training-sized T x T scores)
        if self.impl == "sdpa" or (cache is not None and T == 1):
            y = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=is_causal, enable_gqa=nkv != nh
            )  # (B, nh, T, hs)
        else:
            y = self._math(q, k, v, mask, is_causal, dropout)
        y = y.transpose(1, 2).reshape(B, T, nh * hs)  # (B, T, C)
        return self.o(y)

    def _math(self, q, k, v, mask, is_causal: bool, dropout: float) -> torch.Tensor:
        """The explicit formula, kept beside SDPA so it stays readable (and as a reference).

        QK^T * scale + causal bias is one baddbmm, and softmax runs in the input dtype (PyTorch
        accumulates a bf16 softmax in fp32): in bf16 on a CPU this path trains ~2x faster than SDPA's
        flash kernel (benchmarks/RESULTS.md, "train (GPT)"); configs/gpt-small.yaml selects it.
        """
        if self.n_kv != self.n_head:  # each kv head serves n_head / n_kv consecutive query heads
            rep = self.n_head // self.n_kv
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        B, nh, T, hs = q.shape
        S = k.shape[2]
        q3, k3t = q.reshape(B * nh, T, hs), k.reshape(B * nh, S, hs).transpose(1, 2)  # (B nh, hs, S)
        scale = 1.0 / math.sqrt(hs)
        if is_causal:  # + (T, S) bias: 0 where key <= query position, -inf above the diagonal
            # under torch.compile the bias is traced (a constant to inductor), not looked up in a cache
            make_bias = causal_bias if torch.compiler.is_compiling() else _cached_causal_bias
            bias = make_bias(T, S, q.dtype, q.device)  # (T, S)
            att = torch.baddbmm(bias, q3, k3t, alpha=scale)
        else:
            att = torch.bmm(q3, k3t) * scale
        att = att.view(B, nh, T, S)  # (B, nh, T, T_total)
        if mask is not None:
            att = att.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else att + mask
        att = F.softmax(att, dim=-1)
        if dropout:
            att = F.dropout(att, p=dropout)
        return att @ v  # (B, nh, T, hs)


# ---------------------------------------------------------------------------------------------
# MLP and block


class MLP(nn.Module):
    """gelu | gelu_tanh: proj(act(fc(x))); swiglu: proj(silu(gate(x)) * up(x)) with fc = [gate; up]."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.ff_dim
        self.fc = Linear(cfg.d_model, 2 * hidden if self.kind == "swiglu" else hidden, bias=cfg.bias)
        self.proj = Linear(hidden, cfg.d_model, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)  # (B, T, d_ff) or (B, T, 2 * d_ff)
        if self.kind == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = kernels.gelu_tanh(h) if self.kind == "gelu_tanh" else F.gelu(h)
        return self.dropout(self.proj(h))


class Block(nn.Module):
    """One Transformer layer: attention then MLP, each with a residual and a norm (pre or post)."""

    def __init__(self, cfg: ModelConfig, causal: bool = True):
        super().__init__()
        self.pre = cfg.norm_position == "pre"
        self.ln1 = make_norm(cfg)
        self.attn = Attention(cfg, causal=causal)
        self.ln2 = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()

    def forward(self, x, rope=None, mask=None, cache: KVCache | None = None, layer: int = 0):
        if self.pre:
            x = x + self.drop(self.attn(self.ln1(x), rope, mask, cache, layer))
            return x + self.mlp(self.ln2(x))
        x = self.ln1(x + self.drop(self.attn(x, rope, mask, cache, layer)))
        return self.ln2(x + self.mlp(x))


# ---------------------------------------------------------------------------------------------
# weight-only int8 for decoding (memory-bound on CPU: 4x fewer weight bytes than fp32)


class Int8Linear(nn.Module):
    """y = x @ (w_int8 * scale)^T + b, per-output-channel symmetric int8 weights, bf16 activations.

    Built from a trained nn.Linear by `quantize_int8_`; inference only. On CPU it uses the fused
    kernel `aten._weight_int8pack_mm`, which reads past the row (garbage, or a crash) unless
    in_features is a multiple of 16; other shapes and devices dequantize on the fly.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        w = linear.weight.detach().float()  # (out, in)
        scale = w.abs().amax(dim=1).clamp(min=1e-8) / 127.0  # (out,)
        self.register_buffer("weight_int8", torch.round(w / scale[:, None]).to(torch.int8))
        self.register_buffer("scale", scale.to(torch.bfloat16))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(torch.bfloat16))
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, self.in_features).to(self.scale.dtype)  # (N, in)
        if x2.device.type == "cpu" and self.in_features % 16 == 0:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.weight_int8, self.scale)
        else:
            y = x2 @ (self.weight_int8.to(x2.dtype) * self.scale[:, None]).T
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)  # (..., out)


class PackedLinear(nn.Module):
    """y = x W^T + b with W reordered once into oneDNN's blocked layout: CPU inference only.

    A plain nn.Linear hands oneDNN a row-major weight that it re-blocks on every call; at decoding
    shapes (one row of activations) that costs as much as the product. Packed once, a bf16 GEMV runs
    1.6-2.4x faster with bit-identical results (fp32: same within 1e-4, other summation order), which
    is most of a CPU decoding step. Built by `pack_linears_`; holds no parameters, so the module is
    neither trainable nor saveable, and stays on the CPU.
    """

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.packed = torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 1)  # opaque
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def pack_linears_(model: nn.Module) -> bool:
    """Replace every CPU fp32 / bf16 nn.Linear by a PackedLinear, in place (a tied LM head gets its
    own packed copy). For generation only. Returns False, changing nothing, where oneDNN is missing."""
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")):
        return False
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if (isinstance(child, nn.Linear) and child.weight.device.type == "cpu"
                    and child.weight.dtype in (torch.float32, torch.bfloat16)):
                setattr(module, name, PackedLinear(child))
    return True


def quantize_int8_(model: nn.Module) -> nn.Module:
    """Replace every nn.Linear (a tied LM head too: it gets its own int8 copy) by Int8Linear, then
    cast the rest (embeddings, norms) to bf16. In place; returns the model, for generation only."""
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return model.to(torch.bfloat16)
