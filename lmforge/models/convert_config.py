"""config.json <-> ModelConfig: which Hugging Face architectures lmforge converts, and how their configs map.

    GPT2LMHeadModel   n_embd n_layer n_head n_inner n_positions layer_norm_epsilon activation_function
    LlamaForCausalLM  hidden_size num_hidden_layers num_attention_heads num_key_value_heads
                      intermediate_size max_position_embeddings rms_norm_eps rope_theta | rope_parameters
    Bert*             hidden_size num_hidden_layers num_attention_heads intermediate_size
                      max_position_embeddings layer_norm_eps hidden_act type_vocab_size
    all               vocab_size tie_word_embeddings
Variants lmforge does not implement (rope scaling, attention / MLP biases in Llama, relative positions,
cross-attention, other activations) are CheckpointErrors naming the key, never silently ignored.
The parameter names live in convert_names.py; this file knows only config keys.

    >>> config_from_hf({"architectures": ["GPT2LMHeadModel"], "vocab_size": 50257, "n_positions": 1024,
    ...                 "n_embd": 768, "n_layer": 12, "n_head": 12}).d_ff
    3072
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError

ARCHITECTURES = {  # HF class -> our flavour
    "GPT2LMHeadModel": "gpt2",
    "LlamaForCausalLM": "llama",
    "BertModel": "bert",
    "BertForMaskedLM": "bert",
    "BertForPreTraining": "bert",
}
DEFAULT_ARCH = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForPreTraining"}
GPT2_ACTS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
BERT_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
BERT_HEADS = {"BertForPreTraining": "mlm,nsp", "BertForMaskedLM": "mlm", "BertModel": "none"}
BERT_CLASS = {heads: arch for arch, heads in BERT_HEADS.items()}


def supported() -> str:
    return ", ".join(ARCHITECTURES)



def read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e.__class__.__name__}); fix the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} must hold a JSON object")
    return data



def is_hf_dir(path: str | Path) -> bool:
    """True for a folder whose config.json is a Hugging Face one (it has model_type / architectures)."""
    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        data = json.loads(cfg.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    hf_keys = isinstance(data, dict) and ("model_type" in data or "architectures" in data)
    return hf_keys and "family" not in data


def eos_ids(folder: str | Path) -> list[int]:
    """Every id that ends generation, as the folder's own files name them: `eos_token_id` (an int or a
    list) of config.json, then of generation_config.json, in that order, without repeats. An
    instruct checkpoint lists its end-of-turn token there (Llama 3: <|end_of_text|>, <|eom_id|>,
    <|eot_id|>), which no token name tells apart. A folder that names none gives []; a negative id
    means "unset", as in transformers, and is skipped."""
    out: list[int] = []
    for name in ("config.json", "generation_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        value = read_json(path).get("eos_token_id")
        values = value if isinstance(value, list) else [] if value is None else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise CheckpointError(f"{path}: eos_token_id={value!r} must be a token id or a list of them; "
                                  "fix the file")
        for v in values:  # each id once, also when one file repeats it
            if v >= 0 and v not in out:
                out.append(v)
    return out


def read_hf_config(hf_dir: str | Path) -> dict[str, Any]:
    hf_dir = Path(hf_dir)
    if not hf_dir.is_dir():
        what = "is not a directory" if hf_dir.exists() else "does not exist"
        raise CheckpointError(f"{hf_dir} {what}; give a Hugging Face model folder")
    if not (hf_dir / "config.json").is_file():
        raise CheckpointError(f"{hf_dir} has no config.json; an HF model folder needs config.json + weights")
    return read_json(hf_dir / "config.json")


def hf_architecture(hf: dict[str, Any]) -> str:
    """The HF class name this config describes, or a CheckpointError listing the supported ones."""
    archs = hf.get("architectures") or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise CheckpointError(f"config.json architectures={archs!r} must be a list of class names, "
                              'e.g. ["GPT2LMHeadModel"]; fix config.json')
    model_type = str(hf.get("model_type", "?"))
    arch = archs[0] if archs else DEFAULT_ARCH.get(model_type, model_type)
    if arch not in ARCHITECTURES:
        raise CheckpointError(f"unsupported architecture {arch!r}; supported: {supported()}")
    return arch


def _get(hf: dict[str, Any], key: str, default: Any, tp: type) -> Any:
    """hf[key] (`default` when absent or null), checked to be a `tp`: a float may be written as an int,
    an int never as a float or a string, and a bool is not a number."""
    value = hf.get(key)
    if value is None:
        return default
    allowed = (int, float) if tp is float else tp
    if isinstance(value, bool) != (tp is bool) or not isinstance(value, allowed):
        what = {int: "an integer", float: "a number", bool: "true or false"}[tp]
        raise CheckpointError(f"config.json {key}={value!r} must be {what}; fix config.json")
    return float(value) if tp is float else value


def _need(hf: dict[str, Any], *keys: str) -> int:
    """The first of `keys` that config.json sets, an integer (every required key is a size)."""
    for k in keys:
        if hf.get(k) is not None:
            return _get(hf, k, None, int)
    raise CheckpointError(f"config.json lacks {keys[0]!r}; the checkpoint's config is incomplete")


def _reject(hf: dict[str, Any], key: str, ok: Any, why: str) -> None:
    value = hf.get(key, ok)
    if value != ok and value is not None:
        raise CheckpointError(f"config.json {key}={value!r} is not supported ({why}); only {ok!r} converts")


def _act(hf: dict[str, Any], key: str, table: dict[str, str], default: str) -> str:
    act = hf.get(key, default)  # default: what transformers' config class assumes when the key is absent
    if not isinstance(act, str) or act not in table:
        raise CheckpointError(f"config.json {key}={act!r} is not supported; supported: {', '.join(table)}")
    return table[act]


def _rope(hf: dict[str, Any]) -> float:
    """rope_theta from either layout: transformers 5 `rope_parameters`, 4.x `rope_theta` + `rope_scaling`.

    Any scaling type (`rope_type`, or `type` in older files) in either dict is refused. As in
    transformers, a non-empty `rope_scaling` replaces `rope_parameters`, theta included."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        raise CheckpointError("config.json rope_parameters / rope_scaling must be objects; fix config.json")
    kinds = [d.get(k) for d in (scaling, params) for k in ("rope_type", "type")]
    kind = next((k for k in kinds if k not in (None, "default")), None)
    if kind is not None:
        raise CheckpointError(
            f"config.json rope scaling {kind!r} is not supported (only plain RoPE); remove rope_scaling "
            "only if the model was trained without it"
        )
    theta = _get(scaling or params, "rope_theta", None, float)
    return theta if theta is not None else _get(hf, "rope_theta", 10000.0, float)


def config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    """Translate an HF config.json (dict) into our ModelConfig; unsupported variants raise CheckpointError."""
    flavour = ARCHITECTURES[hf_architecture(hf)]
    try:
        if flavour == "gpt2":
            _reject(hf, "add_cross_attention", False, "cross-attention")
            _reject(hf, "scale_attn_by_inverse_layer_idx", False, "per-layer attention scaling")
            _reject(hf, "scale_attn_weights", True, "unscaled attention")
            d = _need(hf, "n_embd", "hidden_size")
            return ModelConfig(
                family="gpt", vocab_size=_need(hf, "vocab_size"), max_seq_len=_need(hf, "n_positions"),
                n_layer=_need(hf, "n_layer"), n_head=_need(hf, "n_head"), d_model=d,
                d_ff=_get(hf, "n_inner", None, int) or 4 * d, pos="learned", norm="layernorm",
                norm_eps=_get(hf, "layer_norm_epsilon", 1e-5, float), norm_position="pre",
                mlp=_act(hf, "activation_function", GPT2_ACTS, "gelu_new"), bias=True,
                tie_embeddings=_get(hf, "tie_word_embeddings", True, bool),
            )
        if flavour == "llama":
            _reject(hf, "hidden_act", "silu", "Llama's MLP is SwiGLU")
            _reject(hf, "attention_bias", False, "biases in attention projections")
            _reject(hf, "mlp_bias", False, "biases in MLP projections")
            d, nh = _need(hf, "hidden_size"), _need(hf, "num_attention_heads")
            nkv = _get(hf, "num_key_value_heads", None, int) or nh
            cfg = ModelConfig(
                family="gpt", vocab_size=_need(hf, "vocab_size"),
                max_seq_len=_need(hf, "max_position_embeddings"),
                n_layer=_need(hf, "num_hidden_layers"), n_head=nh, n_kv_head=None if nkv == nh else nkv,
                d_model=d, d_ff=_need(hf, "intermediate_size"), pos="rope", rope_theta=_rope(hf),
                norm="rmsnorm", norm_eps=_get(hf, "rms_norm_eps", 1e-6, float), norm_position="pre",
                mlp="swiglu", bias=False, tie_embeddings=_get(hf, "tie_word_embeddings", False, bool),
            )
            _reject(hf, "head_dim", cfg.head_dim, "head_dim must be hidden_size / num_attention_heads")
            return cfg
        _reject(hf, "position_embedding_type", "absolute", "relative position embeddings")
        _reject(hf, "is_decoder", False, "BERT as a decoder")
        _reject(hf, "add_cross_attention", False, "cross-attention")
        return ModelConfig(
            family="bert", vocab_size=_need(hf, "vocab_size"),
            max_seq_len=_need(hf, "max_position_embeddings"),
            n_layer=_need(hf, "num_hidden_layers"), n_head=_need(hf, "num_attention_heads"),
            d_model=_need(hf, "hidden_size"), d_ff=_need(hf, "intermediate_size"), pos="learned",
            norm="layernorm", norm_eps=_get(hf, "layer_norm_eps", 1e-12, float), norm_position="post",
            mlp=_act(hf, "hidden_act", BERT_ACTS, "gelu"), bias=True,
            tie_embeddings=_get(hf, "tie_word_embeddings", True, bool),
            type_vocab_size=_get(hf, "type_vocab_size", 2, int),
            heads=BERT_HEADS[hf_architecture(hf)],  # a guess from the class; the importer reads the tensors
        )
    except ConfigError as e:
        raise CheckpointError(f"config.json does not make a valid model: {e}") from None


def flavour_of(cfg: ModelConfig) -> str:
    """Which HF family can hold this config exactly, or a CheckpointError saying why none can."""
    if cfg.family == "bert":
        want = dict(pos="learned", norm="layernorm", norm_position="post", bias=True, n_kv_head=None)
        flavour = "bert"
    elif cfg.pos == "rope":
        want = dict(norm="rmsnorm", norm_position="pre", mlp="swiglu", bias=False)
        flavour = "llama"
    else:
        want = dict(norm="layernorm", norm_position="pre", bias=True, n_kv_head=None)
        flavour = "gpt2"
    arch = BERT_CLASS[cfg.heads] if flavour == "bert" else DEFAULT_ARCH[flavour]
    for key, value in want.items():
        have = getattr(cfg, key)
        if key == "n_kv_head" and have == cfg.n_head:
            have = None
        if have != value:
            flag = {True: "true", False: "false", None: "null"}.get(value, value)
            raise CheckpointError(f"model.{key}={have!r} has no Hugging Face {arch} equivalent "
                                  f"(needs {value!r}); a run trained with --model.{key}={flag} exports")
    if flavour != "llama" and cfg.mlp not in ("gelu", "gelu_tanh"):
        raise CheckpointError(f"model.mlp={cfg.mlp!r} has no Hugging Face {arch} equivalent "
                              "(needs 'gelu' or 'gelu_tanh')")
    return flavour


def config_to_hf(cfg: ModelConfig, arch: str, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """Our ModelConfig -> an HF config.json dict for `arch` (e.g. 'LlamaForCausalLM')."""
    dt = str(dtype).removeprefix("torch.")
    common = {"architectures": [arch], "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "torch_dtype": dt, "dtype": dt}
    flavour = ARCHITECTURES[arch]
    if flavour == "gpt2":
        act = {"gelu_tanh": "gelu_new", "gelu": "gelu"}[cfg.mlp]
        return {"model_type": "gpt2", **common, "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model,
                "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_inner": cfg.ff_dim,
                "activation_function": act, "layer_norm_epsilon": cfg.norm_eps,
                "attn_pdrop": 0.0, "embd_pdrop": 0.0, "resid_pdrop": 0.0}
    if flavour == "llama":
        return {"model_type": "llama", **common, "max_position_embeddings": cfg.max_seq_len,
                "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
                "num_attention_heads": cfg.n_head, "num_key_value_heads": cfg.kv_heads,
                "head_dim": cfg.head_dim, "intermediate_size": cfg.ff_dim, "hidden_act": "silu",
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": False, "mlp_bias": False}
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh"}[cfg.mlp]
    return {"model_type": "bert", **common, "max_position_embeddings": cfg.max_seq_len,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layer,
            "num_attention_heads": cfg.n_head, "intermediate_size": cfg.ff_dim, "hidden_act": act,
            "layer_norm_eps": cfg.norm_eps, "type_vocab_size": cfg.type_vocab_size,
            "position_embedding_type": "absolute", "hidden_dropout_prob": 0.0,
            "attention_probs_dropout_prob": 0.0, "pad_token_id": 0}


def default_arch(cfg: ModelConfig) -> str:
    """The HF class that holds exactly this model: GPT2LMHeadModel, LlamaForCausalLM or a Bert* class."""
    flavour = flavour_of(cfg)
    return BERT_CLASS[cfg.heads] if flavour == "bert" else DEFAULT_ARCH[flavour]
