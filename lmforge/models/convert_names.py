"""Parameter names across the Hugging Face boundary: the only place HF parameter names appear.

The mapping is a table of rules `ours <- hf names, how`: "=" copy, "T" transpose (GPT-2's Conv1D
stores (in, out)), "cat" concatenate rows (Llama / BERT q, k, v -> our fused qkv; gate, up -> fc).
Each rule runs both ways, so import and export cannot drift apart. HF's Llama q / k rows are already
in rotate-half order, which is the convention of our RoPE (layers.py); no permutation is needed.

The rules speak canonical HF names: `_canonical` drops buffers and strips the optional
`transformer.` / `bert.` prefix on import, `_hf_prefix` puts it back on export. convert.py runs the
rules over state dicts and folders; config keys live in convert_config.py.

    >>> _rules(config_from_hf(gpt2_config_dict), "gpt2")[2]
    Rule(ours='blocks.0.ln1.weight', hf=('h.0.ln_1.weight',), how='=')
"""

from __future__ import annotations

import re
from typing import NamedTuple

import torch

from lmforge.config import ModelConfig

# buffers some checkpoints carry that hold no learned weights (causal masks, RoPE tables, position ids)
IGNORED = re.compile(r"(^|\.)(attn\.bias|attn\.masked_bias|rotary_emb\.inv_freq|embeddings\.position_ids)$")


class Rule(NamedTuple):
    """ours <- hf: how = "=" (copy) | "T" (transpose) | "cat" (rows of the hf tensors, in order)."""

    ours: str
    hf: tuple[str, ...]
    how: str = "="


GPT2_BLOCK = (  # HF module, ours, how its weight maps (Conv1D stores (in, out): transpose)
    ("ln_1", "ln1", "="), ("attn.c_attn", "attn.qkv", "T"), ("attn.c_proj", "attn.o", "T"),
    ("ln_2", "ln2", "="), ("mlp.c_fc", "mlp.fc", "T"), ("mlp.c_proj", "mlp.proj", "T"),
)


def _gpt2_rules(cfg: ModelConfig) -> list[Rule]:
    # canonical HF names without the optional "transformer." prefix (see _canonical)
    rules = [Rule("tok_emb.weight", ("wte.weight",)), Rule("pos_emb.weight", ("wpe.weight",))]
    for i in range(cfg.n_layer):
        h, o = f"h.{i}.", f"blocks.{i}."
        for hf, ours, how in GPT2_BLOCK:
            rules.append(Rule(o + ours + ".weight", (h + hf + ".weight",), how))
            rules.append(Rule(o + ours + ".bias", (h + hf + ".bias",)))
    rules += [Rule("ln_f.weight", ("ln_f.weight",)), Rule("ln_f.bias", ("ln_f.bias",))]
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", ("lm_head.weight",)))
    return rules


def _llama_rules(cfg: ModelConfig) -> list[Rule]:
    rules = [Rule("tok_emb.weight", ("model.embed_tokens.weight",))]
    for i in range(cfg.n_layer):
        h, o = f"model.layers.{i}.", f"blocks.{i}."
        a, m = h + "self_attn.", h + "mlp."
        rules += [
            Rule(o + "ln1.weight", (h + "input_layernorm.weight",)),
            Rule(o + "attn.qkv.weight", tuple(a + x + "_proj.weight" for x in "qkv"), "cat"),
            Rule(o + "attn.o.weight", (a + "o_proj.weight",)),
            Rule(o + "ln2.weight", (h + "post_attention_layernorm.weight",)),
            Rule(o + "mlp.fc.weight", (m + "gate_proj.weight", m + "up_proj.weight"), "cat"),
            Rule(o + "mlp.proj.weight", (m + "down_proj.weight",)),
        ]
    rules.append(Rule("ln_f.weight", ("model.norm.weight",)))
    if not cfg.tie_embeddings:
        rules.append(Rule("head.weight", ("lm_head.weight",)))
    return rules


def _bert_rules(cfg: ModelConfig) -> list[Rule]:
    # canonical HF names without the optional "bert." prefix; heads under "cls." as HF writes them
    e = "embeddings."
    rules = [Rule("tok_emb.weight", (e + "word_embeddings.weight",)),
             Rule("pos_emb.weight", (e + "position_embeddings.weight",)),
             Rule("type_emb.weight", (e + "token_type_embeddings.weight",)),
             Rule("emb_ln.weight", (e + "LayerNorm.weight",)), Rule("emb_ln.bias", (e + "LayerNorm.bias",))]
    for i in range(cfg.n_layer):
        h, o = f"encoder.layer.{i}.", f"blocks.{i}."
        for p in ("weight", "bias"):
            a = h + "attention.self."
            rules += [
                Rule(o + "attn.qkv." + p, (a + "query." + p, a + "key." + p, a + "value." + p), "cat"),
                Rule(o + "attn.o." + p, (h + "attention.output.dense." + p,)),
                Rule(o + "ln1." + p, (h + "attention.output.LayerNorm." + p,)),
                Rule(o + "mlp.fc." + p, (h + "intermediate.dense." + p,)),
                Rule(o + "mlp.proj." + p, (h + "output.dense." + p,)),
                Rule(o + "ln2." + p, (h + "output.LayerNorm." + p,)),
            ]
    if cfg.heads != "mlm":
        rules += [Rule("pooler." + p, ("pooler.dense." + p,)) for p in ("weight", "bias")]
    if cfg.heads != "none":
        c = "cls.predictions."
        rules += [Rule("mlm.dense." + p, (c + "transform.dense." + p,)) for p in ("weight", "bias")]
        rules += [Rule("mlm.ln." + p, (c + "transform.LayerNorm." + p,)) for p in ("weight", "bias")]
        rules.append(Rule("mlm.bias", (c + "bias",)))
        if not cfg.tie_embeddings:
            rules.append(Rule("mlm.decoder.weight", (c + "decoder.weight",)))
    if cfg.heads == "mlm,nsp":
        rules += [Rule("nsp." + p, ("cls.seq_relationship." + p,)) for p in ("weight", "bias")]
    return rules


def _rules(cfg: ModelConfig, flavour: str) -> list[Rule]:
    return {"gpt2": _gpt2_rules, "llama": _llama_rules, "bert": _bert_rules}[flavour](cfg)


def _split_sizes(cfg: ModelConfig, rule: Rule) -> list[int]:
    """Row counts of each HF tensor in a "cat" rule: q, k, v (GQA-aware) or gate, up."""
    if rule.ours.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return [cfg.n_head * cfg.head_dim, cfg.kv_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim]
    return [cfg.ff_dim] * len(rule.hf)


def _canonical(hf_sd: dict[str, torch.Tensor], flavour: str) -> dict[str, torch.Tensor]:
    """Drop buffers, strip the optional `transformer.` / `bert.` prefix, rename old LayerNorm gamma/beta."""
    out = {}
    for k, v in hf_sd.items():
        if IGNORED.search(k):
            continue
        if flavour == "gpt2":
            k = k.removeprefix("transformer.")
        elif flavour == "bert":
            k = k.removeprefix("bert.")
            k = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", k)  # TF-era names
            k = re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k)
        out[k] = v
    return out


def _hf_shapes(rule: Rule, ours: torch.Size, cfg: ModelConfig) -> list[tuple[int, ...]]:
    if rule.how == "T":
        return [tuple(reversed(ours))]
    if rule.how == "cat":
        return [(n, *ours[1:]) for n in _split_sizes(cfg, rule)]
    return [tuple(ours)]


def _hf_prefix(sd: dict[str, torch.Tensor], arch: str) -> dict[str, torch.Tensor]:
    if arch == "GPT2LMHeadModel":
        return {(k if k.startswith("lm_head.") else "transformer." + k): v for k, v in sd.items()}
    if arch in ("BertForPreTraining", "BertForMaskedLM"):
        return {(k if k.startswith("cls.") else "bert." + k): v for k, v in sd.items()}
    return sd


def _bert_heads(sd: dict[str, torch.Tensor]) -> str:
    """Which heads a (canonical) BERT checkpoint carries, read from its tensors, not its config:
    bert-base-uncased says BertForMaskedLM yet ships the NSP head and pooler too."""
    if any(k.startswith("cls.seq_relationship.") for k in sd):
        return "mlm,nsp"
    return "mlm" if any(k.startswith("cls.") for k in sd) else "none"


def _drop_redundant(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Remove copies HF may store of tied tensors: the LM head / MLM decoder when tied to the embedding,
    and one of the two MLM output biases. HF's forward adds cls.predictions.decoder.bias: the same
    tensor as cls.predictions.bias when tied, a separate one (and .bias unused) when untied in
    transformers 5; so decoder.bias is the one kept whenever it is there."""
    sd = dict(sd)
    if cfg.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd.pop("cls.predictions.decoder.weight", None)
    if "cls.predictions.decoder.bias" in sd:
        sd["cls.predictions.bias"] = sd.pop("cls.predictions.decoder.bias")
    return sd


def _add_redundant(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The export side of `_drop_redundant`: an untied MLM head also gets cls.predictions.decoder.bias
    (the one transformers 5's forward adds), a copy of cls.predictions.bias. Unprefixed HF names."""
    if "cls.predictions.bias" in hf_sd and not cfg.tie_embeddings:
        hf_sd["cls.predictions.decoder.bias"] = hf_sd["cls.predictions.bias"].clone()
    return hf_sd
