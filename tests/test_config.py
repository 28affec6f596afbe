"""Configs: every preset loads, overrides are typed, and bad keys/types fail with one clear line."""

import subprocess
import sys

import pytest
import yaml

from lmforge.config import CONFIG_DIR, RunConfig, load_config, parse_overrides, save_run_yaml
from lmforge.errors import ConfigError

PRESETS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_presets_exist():
    assert {"gpt-tiny", "gpt-small", "gpt2-124m", "llama-100m"} <= set(PRESETS)


@pytest.mark.parametrize("name", PRESETS)
def test_every_preset_loads(name):
    cfg = load_config(name)
    assert isinstance(cfg, RunConfig)
    raw = yaml.safe_load((CONFIG_DIR / f"{name}.yaml").read_text())
    for section, values in raw.items():  # every key in the file reached the dataclass
        for key, value in values.items():
            got = getattr(getattr(cfg, section), key)
            assert got == value or (isinstance(value, int) and got == float(value))


def test_dotted_overrides_are_typed():
    cfg = load_config("gpt-tiny", ["--train.lr=3e-4", "--model.n_layer", "3", "--train.compile=true"])
    assert cfg.train.lr == pytest.approx(3e-4) and isinstance(cfg.train.lr, float)
    assert cfg.model.n_layer == 3 and cfg.train.compile is True
    assert parse_overrides(["--generate.stop=[a, b]"]) == {"generate": {"stop": ["a", "b"]}}
    # one stop string, commas and all (only a YAML list gives several); 'User:' is text, not a mapping
    assert load_config("gpt-tiny", ["--generate.stop=Hello, world"]).generate.stop == ["Hello, world"]
    assert load_config("gpt-tiny", ["--generate.stop=User:"]).generate.stop == ["User:"]
    assert load_config("gpt-tiny", ["--train.out_dir=runs/a: b"]).train.out_dir == "runs/a: b"


def test_text_fields_keep_overrides_as_typed():
    # YAML alone would read these as 7, 1000.0 and True
    cfg = load_config("gpt-tiny", ["--train.out_dir=007", "--data.tokenizer=1e3", "--data.shards=yes",
                                   "--train.seed=007"])
    assert (cfg.train.out_dir, cfg.data.tokenizer, cfg.data.shards) == ("007", "1e3", "yes")
    assert cfg.train.seed == 7


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--train.lrr=1"], "unknown config key 'train.lrr'; valid keys:"),
        (["--modle.n_layer=1"], "unknown config key 'modle'"),
        (["--model.n_layer=two"], "model.n_layer must be an integer"),
        (["--train.compile=3"], "train.compile must be true or false"),
        (["--model.norm=batchnorm"], "choose one of: layernorm, rmsnorm"),
        (["--model.n_head=5"], "divisible"),
        (["--model.n_head=0"], "model.n_head must be >= 1, got 0"),  # checked before d_model % n_head
        (["--train.save_every=0"], "train.save_every must be >= 1"),
        (["--train.log_every=0"], "train.log_every must be >= 1"),
        (["--train.lr=-1"], "train.lr must be >= 0"),
        (["--train.seed=-1"], "train.seed must be >= 0"),
        (["--train.warmup_steps=-5"], "train.warmup_steps must be >= 0"),
        (["--train.beta2=1.5"], "train.beta2 must be in [0, 1)"),
        (["--train.mlm_prob=0"], "train.mlm_prob must be in (0, 1)"),
        (["--model.dropout=1.5"], "model.dropout must be in [0, 1), got 1.5"),
        (["--model.d_ff=-4"], "model.d_ff must be >= 1"),
        (["--model.init_std=-1"], "model.init_std must be > 0"),
        (["--model.pos=rope", "--model.d_model=60", "--model.n_head=4"], "rope needs an even head size"),
        (["--train.lr=nan"], "train.lr must be >= 0, got nan"),
        (["--train.max_time=nan"], "train.max_time must be >= 0 seconds"),
        (["--train.max_time=inf"], "train.max_time must be >= 0 seconds"),
        (["--train.lr=inf"], "train.lr must be finite, got inf"),
        (["--data.seq_len=0"], "data.seq_len must be >= 1 (or null: model.max_seq_len), got 0"),
        (["--data.seq_len=-5"], "data.seq_len must be >= 1"),
        (["--model.n_kv_head=0"], "model.n_kv_head must be >= 1 (or null: model.n_head), got 0"),
        (["--model.init_std=inf"], "model.init_std must be > 0 and finite, got inf"),  # inf weights
        (["--model.norm_eps=.inf"], "model.norm_eps must be > 0 and finite, got inf"),
        (["--model.rope_theta=inf"], "model.rope_theta must be > 0 and finite, got inf"),
        (["--train.eps=inf"], "train.eps must be > 0 and finite, got inf"),  # AdamW would never move
        (["--train.peak_flops=-1e12"], "train.peak_flops must be > 0 FLOP/s (or null: detect)"),
        (["--train.peak_flops=0"], "train.peak_flops must be > 0 FLOP/s"),  # MFU = x / 0
        (["--train.lr=true"], "train.lr must be a number, got True"),  # a bool is no number (1.0)
        (["--train.keep_last=-1"], "train.keep_last must be >= 0, got -1"),
        (["--model.dropout=1"], "model.dropout must be in [0, 1), got 1"),  # every activation zeroed
    ],
)
def test_bad_overrides_name_the_key(args, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config("gpt-tiny", args)
    assert needle in str(e.value)


def test_a_yaml_section_that_is_not_a_mapping_is_refused_even_with_overrides(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: 5\ntrain: {max_steps: 3}\n")
    for over in ([], ["--model.n_layer=2"]):
        with pytest.raises(ConfigError, match="model"):
            load_config(str(tmp_path / "bad.yaml"), over)
    with pytest.raises(ConfigError, match="model must be a mapping of keys, got 5"):
        load_config(str(tmp_path / "bad.yaml"), ["--model.n_layer=2"])


def test_unknown_preset_lists_choices():
    with pytest.raises(ConfigError) as e:
        load_config("gpt-huge")
    assert "gpt-tiny" in str(e.value)


def test_a_folder_named_like_a_preset_does_not_shadow_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gpt-tiny").mkdir()  # e.g. a run dir from `--out gpt-tiny`
    assert load_config("gpt-tiny").model.n_layer == 2
    (tmp_path / "mine.yaml").mkdir()
    with pytest.raises(ConfigError, match="is not a file"):
        load_config("mine.yaml")


def test_run_yaml_records_config_seed_git(tmp_path):
    cfg = load_config("gpt-tiny", ["--train.seed=7"])
    doc = yaml.safe_load(save_run_yaml(cfg, tmp_path).read_text())
    assert doc["seed"] == 7 and doc["config"]["model"]["n_layer"] == 2 and "git" in doc


def test_cli_config_error_is_one_line_exit_2():
    r = subprocess.run(
        [sys.executable, "-m", "lmforge", "model", "info", "gpt-tiny", "--model.nlayer=2"],
        capture_output=True, text=True,
    )
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "model.nlayer" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("args, needle", [
    (["--model.n_layer=2.5"], "model.n_layer must be an integer, got 2.5"),  # never silently 2
    (["--model.n_layer=null"], "model.n_layer must be an integer, got None"),  # null only for X | None
    (["--model.n_head=4", "--model.n_kv_head=3"], "model.n_head=4 must be a multiple of model.n_kv_head=3"),
])
def test_more_bad_overrides_name_the_key(args, needle):
    with pytest.raises(ConfigError) as e:
        load_config("gpt-tiny", args)
    assert needle in str(e.value)
    assert load_config("gpt-tiny", ["--model.n_layer=3.0", "--model.n_kv_head=null"]).model.n_layer == 3


def test_a_yaml_bool_is_not_a_text_value(tmp_path):
    """`device: true` in a YAML file is a mistake, not the device 'True'."""
    (tmp_path / "c.yaml").write_text("train: {device: true}\n")
    with pytest.raises(ConfigError, match="train.device must be a string, got True"):
        load_config(str(tmp_path / "c.yaml"))
    with pytest.raises(ConfigError, match="train.out_dir must be a string, got False"):
        load_config("gpt-tiny", {"train": {"out_dir": False}})


@pytest.mark.parametrize("args, check", [
    (["--train.out_dir=@runs"], lambda cfg: cfg.train.out_dir == "@runs"),  # a text field: as typed
    (["--train.out_dir", "runs/%d"], lambda cfg: cfg.train.out_dir == "runs/%d"),
    (["--data.tokenizer=*tok"], lambda cfg: cfg.data.tokenizer == "*tok"),
    (["--train.lr=@"], "train.lr must be a number, got '@'"),
    (["--model.n_layer=["], "model.n_layer must be an integer, got '['"),
    (["--train.compile=%x"], "train.compile must be true or false, got '%x'"),
    (["--nope.x=@"], "unknown config key 'nope'"),
])
def test_an_override_yaml_cannot_read_is_its_text_never_a_traceback(args, check):
    """'@', '%', '*' and an open '[' start YAML syntax; the value is then the text as typed."""
    if callable(check):
        assert check(load_config("gpt-tiny", args))
        return
    with pytest.raises(ConfigError) as e:
        load_config("gpt-tiny", args)
    assert check in str(e.value)


def test_a_dotted_override_below_a_value_names_the_override_not_the_yaml():
    with pytest.raises(ConfigError) as e:
        load_config("bert-tiny", ["--train.lr.x=1"])  # bert-tiny.yaml sets train.lr
    assert str(e.value) == "train.lr is a single value, not a section of keys; set it as --train.lr=VALUE"


@pytest.mark.parametrize("value", [0, -1])
def test_type_vocab_size_below_one_is_refused(value):
    with pytest.raises(ConfigError, match=f"model.type_vocab_size must be >= 1, got {value}"):
        load_config("bert-tiny", [f"--model.type_vocab_size={value}"])


def test_cli_unknown_option_without_a_verb_is_a_usage_error_on_stderr(capsys):
    from lmforge.cli import main

    assert main(["--bogus"]) == 2
    out, err = capsys.readouterr()
    assert "VERB" in out  # the help, as before
    assert err.startswith("error: unrecognized arguments: --bogus;") and err.count("\n") == 1, err


@pytest.mark.parametrize("verb, what", [("data", "COMMAND"), ("model", "CMD"), ("tokenizer", "ACTION")])
def test_a_verb_of_sub_commands_without_one_is_a_usage_error(verb, what, capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main([verb])
    assert e.value.code == 2
    assert f"error: the following arguments are required: {what}" in capsys.readouterr().err


def test_cli_without_arguments_prints_the_help_and_succeeds(capsys):
    from lmforge.cli import main

    assert main([]) == 0
    out, err = capsys.readouterr()
    assert "VERB" in out and err == ""


def test_cli_unknown_option_of_a_verb_without_overrides_is_a_usage_error(capsys):
    from lmforge.cli import main

    with pytest.raises(SystemExit) as e:
        main(["data", "list", "--bogus"])  # a mistyped flag is never silently ignored
    assert e.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err
