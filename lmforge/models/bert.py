"""Bidirectional encoder (the `bert` family): BERT (Devlin et al. 2018), top to bottom.

Architecture (configs/bert-base.yaml), numerically identical to Hugging Face `BertModel`:
  embeddings  token + learned absolute position + segment (token_type), then LayerNorm, dropout
  blocks      bidirectional attention with a padding mask; post-LN as the paper:
              x = LN(x + attn(x)); x = LN(x + mlp(x))   (norm_position=pre: x + f(LN(x)), + final LN)
  MLP         GELU, exact erf form (mlp=gelu); LayerNorm eps from config (BERT: 1e-12)
  pooler      tanh(dense(h[CLS]))                     -> pooler_output, the NSP head's input
  MLM head    decoder(LN(gelu(dense(h)))) + bias, decoder tied to the token embedding
  NSP head    Linear(d_model -> 2) on the pooler; label 0 = B follows A, 1 = B is random
Init as BERT: N(0, init_std) for every Linear / Embedding, zero biases, unit norms.

`model.heads` picks which of Hugging Face's three classes the network mirrors:
    mlm,nsp   pooler + MLM + NSP        (BertForPreTraining; objective mlm,nsp)
    mlm       MLM only, no pooler       (BertForMaskedLM; objective mlm)
    none      encoder + pooler          (BertModel: imported sentence encoders, `lmforge embed`)
The store's registry builds `BertForPreTraining` for family bert; `heads` decides its parts.

Parameter names (what model.safetensors holds; convert_names.py maps HF names onto these):
    tok_emb.weight (V, d)   pos_emb.weight (max_seq_len, d)   type_emb.weight (type_vocab_size, d)
    emb_ln.{weight,bias}                               LayerNorm after the embedding sum
    blocks.N.attn.qkv.{weight,bias}  (3 d, d)          rows [q; k; v]
    blocks.N.attn.o.{weight,bias}    (d, d)
    blocks.N.ln1.{weight,bias}                         post-LN: after attention + residual
    blocks.N.mlp.fc.{weight,bias}    (d_ff, d)
    blocks.N.mlp.proj.{weight,bias}  (d, d_ff)
    blocks.N.ln2.{weight,bias}                         post-LN: after MLP + residual
    ln_f.{weight,bias}                                 norm_position=pre only
    pooler.{weight,bias}             (d, d)            heads mlm,nsp | none
    mlm.dense.{weight,bias} (d, d)   mlm.ln.{weight,bias}   mlm.bias (V,)
    mlm.decoder.weight (V, d)                          only with tie_embeddings=false
    nsp.{weight,bias}                (2, d)            heads mlm,nsp

    >>> model = BertForPreTraining(load_config("bert-tiny").model)
    >>> out = model(torch.tensor([[2, 7, 8, 3]]))
    >>> out.last_hidden_state.shape, out.mlm_logits.shape, out.nsp_logits.shape
    (torch.Size([1, 4, 64]), torch.Size([1, 4, 512]), torch.Size([1, 2]))
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.models.layers import Block, LayerNorm, RMSNorm, build_attn_mask, make_norm


@dataclass
class BertOutput:
    """What an encoder returns; attribute names follow Hugging Face (`outputs.last_hidden_state`)."""

    last_hidden_state: torch.Tensor  # (B, T, C)
    pooler_output: torch.Tensor | None = None  # (B, C); None without a pooler (heads=mlm)
    mlm_logits: torch.Tensor | None = None  # (B, T, V), or (N, V) at the N positions asked for
    nsp_logits: torch.Tensor | None = None  # (B, 2)

    def __getitem__(self, key: str) -> torch.Tensor | None:
        return getattr(self, key)


class BertModel(nn.Module):
    """The encoder: embeddings + blocks (+ pooler) -> BertOutput(last_hidden_state, pooler_output)."""

    def __init__(self, cfg: ModelConfig, pooler: bool = True):
        super().__init__()
        if cfg.family != "bert":
            raise ConfigError(f"BERT needs model.family=bert, got {cfg.family!r}")
        if cfg.pos != "learned":
            raise ConfigError("BERT uses learned positions; set model.pos=learned")
        self.cfg = cfg
        self.gradient_checkpointing = False  # the Trainer sets this from train.activation_checkpointing
        d = cfg.d_model
        self.tok_emb = nn.Embedding(cfg.vocab_size, d)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, d)
        self.type_emb = nn.Embedding(cfg.type_vocab_size, d)
        self.emb_ln = LayerNorm(d, cfg.norm_eps, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout) if cfg.dropout else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, causal=False) for _ in range(cfg.n_layer))
        self.ln_f = make_norm(cfg) if cfg.norm_position == "pre" else None
        self.pooler = nn.Linear(d, d) if pooler else None

    def reset_parameters(self) -> None:
        """BERT init: N(0, init_std) for weights of Linear / Embedding, zeros for biases, ones for norms."""
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, 0.0, self.cfg.init_std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, (LayerNorm, RMSNorm)):
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters (a tied decoder counts once); non_embedding drops the three tables."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= sum(e.weight.numel() for e in (self.tok_emb, self.pos_emb, self.type_emb))
        return n

    def encode(
        self,
        input_ids: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T) -> hidden states (B, T, C). attention_mask (B, T): 1 = token, 0 = padding."""
        B, T = input_ids.shape
        if T > self.cfg.max_seq_len:
            raise ConfigError(f"sequence of {T} tokens is longer than the model's context "
                              f"(model.max_seq_len={self.cfg.max_seq_len}); shorten the input")
        pe = self.pos_emb.weight[:T] if position_ids is None else self.pos_emb(position_ids)  # (T|B,T, C)
        te = self.type_emb.weight[0] if token_type_ids is None else self.type_emb(token_type_ids)
        x = self.drop(self.emb_ln(self.tok_emb(input_ids) + pe + te))  # (B, T, C)
        if attention_mask is not None and bool(attention_mask.all()):
            attention_mask = None  # no padding: let SDPA take its unmasked fast path
        mask = build_attn_mask(attention_mask, T, T, causal=False, device=input_ids.device)  # (B,1,T,T)|None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, None, mask, use_reentrant=False)
            else:
                x = block(x, None, mask)
        return x if self.ln_f is None else self.ln_f(x)

    def pool(self, h: torch.Tensor) -> torch.Tensor | None:
        """tanh(dense(h[:, 0])): (B, T, C) -> (B, C), the [CLS] summary the NSP head reads."""
        return None if self.pooler is None else torch.tanh(self.pooler(h[:, 0]))

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None) -> BertOutput:
        h = self.encode(input_ids, token_type_ids, attention_mask, position_ids)
        return BertOutput(last_hidden_state=h, pooler_output=self.pool(h))


class MLMHead(nn.Module):
    """h (.., C) -> logits (.., V): decoder(LN(act(dense(h)))) + bias; decoder = tok_emb when tied."""

    def __init__(self, cfg: ModelConfig, tok_emb: nn.Embedding):
        super().__init__()
        self.approximate = "tanh" if cfg.mlp == "gelu_tanh" else "none"
        self.dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.ln = LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)
        self.decoder = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tok_emb = [tok_emb]  # a list, so the tied table is not registered twice as a submodule
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = self.ln(F.gelu(self.dense(h), approximate=self.approximate))
        weight = self.tok_emb[0].weight if self.decoder is None else self.decoder.weight  # (V, C)
        return F.linear(h, weight, self.bias)


class BertForPreTraining(BertModel):
    """Encoder + the heads `cfg.heads` names (mlm,nsp | mlm | none); forward -> BertOutput with logits.

    mlm_positions (B, T) bool: compute MLM logits only there -> mlm_logits (N, V) in row-major
    order of the True entries (training scores ~15% of positions, so this skips ~85% of the
    largest matmul); None -> (B, T, V) everywhere.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg, pooler=cfg.heads != "mlm")
        self.mlm = MLMHead(cfg, self.tok_emb) if cfg.heads != "none" else None
        self.nsp = nn.Linear(cfg.d_model, 2) if cfg.heads == "mlm,nsp" else None
        self.reset_parameters()

    def forward(self, input_ids, token_type_ids=None, attention_mask=None, position_ids=None,
                mlm_positions: torch.Tensor | None = None) -> BertOutput:
        h = self.encode(input_ids, token_type_ids, attention_mask, position_ids)  # (B, T, C)
        pooled = self.pool(h)  # (B, C) or None
        mlm = None
        if self.mlm is not None:
            mlm = self.mlm(h if mlm_positions is None else h[mlm_positions])  # (B, T, V) | (N, V)
        nsp = self.nsp(pooled) if self.nsp is not None else None  # (B, 2)
        return BertOutput(last_hidden_state=h, pooler_output=pooled, mlm_logits=mlm, nsp_logits=nsp)
