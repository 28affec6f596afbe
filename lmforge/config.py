"""Typed configuration: dataclasses for model / data / train / generate, YAML presets, dotted overrides.

One naming vocabulary for every model family, defined here once:
    vocab_size, max_seq_len, n_layer, n_head, n_kv_head, d_model, d_ff

A run is configured by a `RunConfig` built from (1) dataclass defaults, (2) a YAML preset in
`configs/` (or any YAML path), (3) dotted CLI overrides such as `--train.lr=3e-4`. Unknown keys
and wrong types raise `ConfigError` naming the key and the valid choices.

    >>> cfg = load_config("gpt-tiny", ["--train.lr=1e-3"])
    >>> cfg.train.lr
    0.001
"""

from __future__ import annotations

import dataclasses
import math
import subprocess
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from lmforge.errors import ConfigError

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class ModelConfig:
    """The network's shape. Shared by every family; family-specific fields say so."""

    family: str = "gpt"  # gpt | bert
    vocab_size: int = 8192
    max_seq_len: int = 256  # longest sequence the position table / RoPE cache covers
    n_layer: int = 6
    n_head: int = 6
    n_kv_head: int | None = None  # grouped-query attention; None = n_head (plain multi-head)
    d_model: int = 384
    d_ff: int | None = None  # MLP hidden size; None = 4 * d_model
    pos: str = "learned"  # learned (GPT-2, BERT) | rope (Llama)
    rope_theta: float = 10000.0
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    norm_position: str = "pre"  # pre (GPT-2, Llama) | post (original BERT)
    mlp: str = "gelu_tanh"  # gelu (exact erf) | gelu_tanh (GPT-2) | swiglu (Llama)
    bias: bool = True  # biases in linear layers and norms
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    dropout: float = 0.0
    attn_impl: str = "sdpa"  # sdpa (F.scaled_dot_product_attention) | math (explicit softmax)
    type_vocab_size: int = 2  # bert: segment embeddings (NSP sentence A / B)
    heads: str = "mlm,nsp"  # bert: mlm,nsp (pretraining) | mlm (masked LM) | none (encoder + pooler)
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _choice("model.family", self.family, ("gpt", "bert"))
        _choice("model.pos", self.pos, ("learned", "rope"))
        _choice("model.norm", self.norm, ("layernorm", "rmsnorm"))
        _choice("model.norm_position", self.norm_position, ("pre", "post"))
        _choice("model.mlp", self.mlp, ("gelu", "gelu_tanh", "swiglu"))
        _choice("model.attn_impl", self.attn_impl, ("sdpa", "math"))
        _choice("model.heads", self.heads, ("mlm,nsp", "mlm", "none"))
        # before any division; type_vocab_size: a bert's segment table (gpt builds none)
        for name in ("vocab_size", "max_seq_len", "n_layer", "n_head", "d_model", "type_vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_head:
            raise ConfigError(f"model.d_model={self.d_model} must be divisible by model.n_head={self.n_head}")
        if self.n_kv_head is not None and self.n_kv_head < 1:
            raise ConfigError(f"model.n_kv_head must be >= 1 (or null: model.n_head), got {self.n_kv_head}")
        if self.n_head % self.kv_heads:
            raise ConfigError(
                f"model.n_head={self.n_head} must be a multiple of model.n_kv_head={self.n_kv_head}"
            )
        if self.d_ff is not None and self.d_ff < 1:
            raise ConfigError(f"model.d_ff must be >= 1 (or null: 4 * d_model), got {self.d_ff}")
        if self.pos == "rope" and self.head_dim % 2:
            raise ConfigError(f"model.pos=rope needs an even head size, got d_model/n_head={self.head_dim}; "
                              "change model.d_model or model.n_head")
        if not 0.0 <= self.dropout < 1.0:  # written so that NaN fails too, as below
            raise ConfigError(f"model.dropout must be in [0, 1), got {self.dropout}")
        for name in ("init_std", "norm_eps", "rope_theta"):
            if not 0 < getattr(self, name) < math.inf:  # NaN fails too
                raise ConfigError(f"model.{name} must be > 0 and finite, got {getattr(self, name)}")

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def ff_dim(self) -> int:
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head


@dataclass
class DataConfig:
    """Where training tokens come from: a folder written by `lmforge prepare`."""

    shards: str = ""  # folder with train/ val/ shards and meta.json
    tokenizer: str = ""  # tokenizer.json; default: the one `prepare` recorded in meta.json
    seq_len: int | None = None  # training window length; None = model.max_seq_len

    def __post_init__(self) -> None:
        if self.seq_len is not None and self.seq_len < 1:
            raise ConfigError(f"data.seq_len must be >= 1 (or null: model.max_seq_len), got {self.seq_len}")


@dataclass
class TrainConfig:
    """The one training loop's knobs. `objective` picks what is scored: clm | mlm | mlm,nsp."""

    objective: str = "clm"
    out_dir: str = "runs/run"
    init_from: str = ""  # run dir / imported HF folder whose weights start a new run (fixes model.*)
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "bf16"  # bf16 (autocast) | fp32
    compile: bool = False
    activation_checkpointing: bool = False
    keep_freed_memory: bool = True  # CPU: glibc keeps freed blocks (no page faults each step)
    fused_kernels: bool = True  # GELU, linear + bias (CPU), cross-entropy (CPU, CUDA): lmforge/kernels.py
    batch_size: int = 16  # micro-batch, sequences
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000
    max_time: float | None = None  # seconds; stop (and checkpoint) when exceeded
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    schedule: str = "cosine"  # cosine | linear | constant
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # max global grad norm; 0 disables
    eval_every: int = 200
    eval_steps: int = 20
    log_every: int = 10
    save_every: int = 500
    keep_last: int = 2
    peak_flops: float | None = None  # per device, for MFU; None = detect
    mlm_prob: float = 0.15
    whole_word_mask: bool = False
    nsp_weight: int | None = None  # mlm,nsp: targets one NSP pair counts as; None = round(mlm_prob * seq_len)
    short_seq_prob: float = 0.1  # mlm,nsp: share of documents whose pairs aim at a random shorter length
    tensorboard: bool = True

    def __post_init__(self) -> None:
        _choice("train.dtype", self.dtype, ("bf16", "fp32"))
        _choice("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _choice("train.objective", self.objective, ("clm", "mlm", "mlm,nsp"))
        for name in ("batch_size", "grad_accum", "max_steps", "log_every", "save_every", "eval_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("seed", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip", "eval_every",
                     "keep_last"):
            value = getattr(self, name)
            if not 0 <= value < math.inf:  # NaN fails too
                need = "finite" if value == math.inf else ">= 0"
                raise ConfigError(f"train.{name} must be {need}, got {value}")
        for name in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if not 0 < self.eps < math.inf:
            raise ConfigError(f"train.eps must be > 0 and finite, got {self.eps}")
        if self.peak_flops is not None and not 0 < self.peak_flops < math.inf:
            raise ConfigError(f"train.peak_flops must be > 0 FLOP/s (or null: detect), got {self.peak_flops}")
        if self.max_time is not None and not 0 <= self.max_time < math.inf:
            raise ConfigError(f"train.max_time must be >= 0 seconds (or null: no limit), got {self.max_time}")
        if not 0.0 < self.mlm_prob < 1.0:
            raise ConfigError(f"train.mlm_prob must be in (0, 1), got {self.mlm_prob}")
        if self.nsp_weight is not None and self.nsp_weight < 1:
            raise ConfigError(f"train.nsp_weight must be >= 1 (or null: the default), got {self.nsp_weight}")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ConfigError(f"train.short_seq_prob must be in [0, 1], got {self.short_seq_prob}")


@dataclass
class GenerateConfig:
    """Decoding settings for `generate()` and `lmforge generate`."""

    max_new_tokens: int = 128
    temperature: float = 1.0  # 0 = greedy
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(choices)}")


# ---------------------------------------------------------------------------------------------
# building configs from dicts, presets and overrides


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the annotation `tp` (str, int, float, bool, X | None, list[str])."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, value, inner[0])
    if origin is list:
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [_coerce(key, v, args[0]) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads '3e-4' (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def from_dict(cls: type, data: dict[str, Any] | None, prefix: str = "") -> Any:
    """Build dataclass `cls` from a (possibly nested, possibly partial) dict, checking keys and types."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in fields:
            raise ConfigError(
                f"unknown config key '{prefix}{key}'; valid keys: {', '.join(sorted(fields))}"
            )
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(f"{prefix}{key}", value, tp)
    return cls(**kwargs)


def preset_path(name_or_path: str) -> Path:
    """A YAML file path (anything ending in .yaml/.yml, or an existing file), else a preset name.

    A folder is never a config: `--out gpt-small` next to the preset gpt-small must not shadow it.
    """
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.is_file():
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist" if not p.exists() else
                              f"config {p} is not a file; give a YAML file or a preset name")
        return p
    cand = CONFIG_DIR / f"{name_or_path}.yaml"
    if not cand.exists():
        names = ", ".join(sorted(x.stem for x in CONFIG_DIR.glob("*.yaml")))
        raise ConfigError(f"no preset named {name_or_path!r}; choose one of: {names}, or give a YAML path")
    return cand


def read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid YAML ({e.__class__.__name__}); fix the file") from None
    except OSError as e:
        raise ConfigError(f"cannot read config {path} ({e.strerror or e.__class__.__name__})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of sections (model:, data:, train:, generate:)")
    return data


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """['--train.lr=3e-4', '--model.n_layer', '2'] -> {'train': {'lr': 0.0003}, 'model': {'n_layer': 2}}"""
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or "." not in arg.split("=")[0]:
            raise ConfigError(f"unrecognised argument {arg!r}; overrides look like --section.key=value")
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
        else:
            if i + 1 >= len(args):
                raise ConfigError(f"override {arg} needs a value: {arg}=VALUE")
            key, raw = arg[2:], args[i + 1]
            i += 1
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:  # '@x', 'runs/%d', '[a': the text as typed; from_dict names a type it lacks
            value = raw
        parts = key.split(".")
        tp = _field_type(parts)
        if _is_text(tp) and not isinstance(value, (str, list, dict)) and value is not None:
            value = raw  # a text field takes the text as typed: --train.out_dir=007 is '007', not '7'
        if isinstance(value, dict) and (_is_text(tp) or tp == list[str]):
            value = raw  # 'User:' or 'a: b' read as a YAML mapping, which no text field takes
        node = out
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
        i += 1
    return out


def _field_type(parts: list[str]) -> Any:
    """The annotation of the dotted config field `parts` (None when there is no such field)."""
    tp: Any = RunConfig
    for part in parts:
        if not dataclasses.is_dataclass(tp):
            return None
        tp = typing.get_type_hints(tp).get(part)
    return tp


def _is_text(tp: Any) -> bool:
    return tp is str or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                         and [a for a in typing.get_args(tp) if a is not type(None)] == [str])


def merge(base: dict[str, Any], over: dict[str, Any], where: str = "") -> dict[str, Any]:
    """`over` on top of `base`, section by section; a section that is not a mapping is an error."""
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and out.get(k) is not None and not isinstance(out[k], dict):
            if not dataclasses.is_dataclass(_field_type(f"{where}{k}".split("."))):  # --train.lr.x=1
                raise ConfigError(f"{where}{k} is a single value, not a section of keys; set it as "
                                  f"--{where}{k}=VALUE")
            raise ConfigError(f"{where}{k} must be a mapping of keys, got {out[k]!r}; fix the YAML file")
        both = isinstance(v, dict) and isinstance(out.get(k), dict)
        out[k] = merge(out[k], v, f"{where}{k}.") if both else v
    return out


def load_config(preset: str | None = None, overrides: list[str] | dict | None = None) -> RunConfig:
    """Defaults <- preset YAML <- overrides (list of '--a.b=c' strings or a nested dict)."""
    data: dict[str, Any] = read_yaml(preset_path(preset)) if preset else {}
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    data = merge(data, overrides or {})
    return from_dict(RunConfig, data)


def git_hash() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def save_run_yaml(cfg: RunConfig, out_dir: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write run.yaml (resolved config + seed + git hash) into an output dir, atomically."""
    from lmforge.io import atomic_write_text

    doc = {"config": cfg.to_dict(), "seed": cfg.train.seed, "git": git_hash(), **(extra or {})}
    path = Path(out_dir) / "run.yaml"
    atomic_write_text(path, yaml.safe_dump(doc, sort_keys=False))
    return path


def read_run_train(path: str | Path) -> dict[str, Any]:
    """The train section a run.yaml recorded; raises ValueError (saying why) when it cannot be read."""
    try:
        train = yaml.safe_load(Path(path).read_text(encoding="utf-8"))["config"]["train"]
    except (OSError, UnicodeDecodeError, yaml.YAMLError, KeyError, TypeError) as e:
        raise ValueError(type(e).__name__) from e
    if not isinstance(train, dict):
        raise ValueError("train is not a mapping")
    return train
