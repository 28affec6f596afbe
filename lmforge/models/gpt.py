"""Decoder-only Transformer (the `gpt` family), top to bottom, in two flavours from one ModelConfig.

GPT-2 flavour (configs/gpt2-124m.yaml)         Llama flavour (configs/llama-100m.yaml)
  learned absolute positions (pos=learned)       rotary positions, rotate-half (pos=rope)
  LayerNorm with bias, eps 1e-5                  RMSNorm in fp32, eps 1e-6 (norm=rmsnorm)
  GELU, tanh approximation (mlp=gelu_tanh)       SwiGLU: proj(silu(gate(x)) * up(x)) (mlp=swiglu)
  biases in every Linear (bias=true)             no biases (bias=false)
  multi-head attention                           grouped-query attention (n_kv_head < n_head)
  LM head tied to the token embedding            untied LM head (tie_embeddings=false)
Both: pre-norm blocks, a final norm `ln_f`, causal attention via SDPA (or the explicit math),
GPT-2 init (N(0, 0.02), residual projections scaled by 1/sqrt(2 * n_layer)), no dropout by default.

Parameter names (what model.safetensors holds; convert_names.py maps HF names onto these):
    tok_emb.weight                 (vocab_size, d_model)
    pos_emb.weight                 (max_seq_len, d_model)            pos=learned only
    blocks.N.ln1.{weight,bias}     norm before attention             bias only with LayerNorm + bias
    blocks.N.attn.qkv.{weight,bias} ((n_head + 2 n_kv_head) hs, d)   rows [q; k; v] (GPT-2 c_attn.T,
                                                                      Llama cat(q_proj, k_proj, v_proj))
    blocks.N.attn.o.{weight,bias}  (d_model, d_model)
    blocks.N.ln2.{weight,bias}     norm before the MLP
    blocks.N.mlp.fc.{weight,bias}  (d_ff, d) or, swiglu, (2 d_ff, d) rows [gate; up]
    blocks.N.mlp.proj.{weight,bias} (d_model, d_ff)
    ln_f.{weight,bias}             final norm
    head.weight                    (vocab_size, d_model); absent from the file when tied

    >>> model = GPT(load_config("gpt-tiny").model)
    >>> model(torch.tensor([[1, 2, 3]])).shape
    torch.Size([1, 3, 512])
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.models.layers import Block, KVCache, build_attn_mask, make_norm, rope_cache


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.family != "gpt":
            raise ConfigError(f"GPT needs model.family=gpt, got {cfg.family!r}")
        self.cfg = cfg
        self.gradient_checkpointing = False  # the Trainer sets this from train.activation_checkpointing
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, causal=True) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.pos == "rope":
            cos, sin = rope_cache(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)  # (max_len, hs)
            self.register_buffer("rope_cos", cos, persistent=False)
            self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()
        if cfg.tie_embeddings:
            self.head.weight = self.tok_emb.weight

    def reset_parameters(self) -> None:
        """GPT-2 init: N(0, init_std) everywhere, residual projections scaled by 1/sqrt(2 n_layer)."""
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif ".ln" in name or name.startswith("ln_f"):
                nn.init.ones_(p)
            elif name.endswith(("attn.o.weight", "mlp.proj.weight")):
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.n_layer))
            else:
                nn.init.normal_(p, 0.0, std)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied head counts once); non_embedding drops tok_emb / pos_emb."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.tok_emb.weight.numel()
            if self.pos_emb is not None:
                n -= self.pos_emb.weight.numel()
        return n

    def make_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None
                   ) -> KVCache:
        """An empty KV cache for `batch_size` rows and up to `max_len` positions (default max_seq_len)."""
        c = self.cfg
        p = self.tok_emb.weight
        return KVCache(c.n_layer, batch_size, c.kv_heads, max_len or c.max_seq_len, c.head_dim,
                       dtype=dtype or p.dtype, device=p.device)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), or (B, 1, V) with last_only.

        attention_mask (B, past + T): 1 = token, 0 = padding (left padding for batched prompts).
        position_ids (B, T): defaults to past..past+T-1; give them with left padding.
        cache: a KVCache from make_cache(); this call appends T positions to it.
        """
        B, T = input_ids.shape
        past = cache.pos if cache is not None else 0
        # the context limits positions, not cache slots: a left-padded short row may run past the
        # longest prompt's limit (its padding fills slots, not positions)
        last = past + T if position_ids is None else int(position_ids.max()) + 1
        if last > self.cfg.max_seq_len:
            raise ConfigError(
                f"sequence of {last} tokens is longer than the model's context "
                f"(model.max_seq_len={self.cfg.max_seq_len}); shorten the input"
            )
        x = self.tok_emb(input_ids)  # (B, T, C)
        rope = None
        if self.pos_emb is not None:
            pe = self.pos_emb.weight[past:past + T] if position_ids is None else self.pos_emb(position_ids)
            x = x + pe  # (B or 1, T, C) broadcast
        else:
            if position_ids is None:
                cos, sin = self.rope_cos[past:past + T], self.rope_sin[past:past + T]  # (T, hs)
            else:
                cos, sin = self.rope_cos[position_ids][:, None], self.rope_sin[position_ids][:, None]
            dev = x.device.type
            dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
            rope = (cos.to(dt), sin.to(dt))  # (T, hs) or (B, 1, T, hs): broadcast over (B, nh, T, hs)
        x = self.drop(x)
        mask = build_attn_mask(attention_mask, T, past + T, causal=True,
                               device=input_ids.device)  # (B, 1, T, past+T) or None
        for i, block in enumerate(self.blocks):
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, None, i, use_reentrant=False)
            else:
                x = block(x, rope, mask, cache, i)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]  # (B, 1, C): at generation only the next-token logits are needed
        return self.head(self.ln_f(x))  # (B, T, V)
