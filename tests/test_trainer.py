"""The one Trainer: accumulation equals the big batch (padding too), run dir, NaN / time stops, CLI."""

import copy
import errno
import io
import json
import math
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml

from lmforge.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from lmforge.models.gpt import GPT
from lmforge.models.store import load_model
from lmforge.objectives.clm import CausalLM
from lmforge.train import checkpoint as ck
from lmforge.train.optim import lr_at
from lmforge.train.trainer import Trainer, TrainingError

SEQ = 16


class ListStream:
    """Windows from a fixed tensor, in order; some rows end in unscored (-100) 'padding' of varying length."""

    def __init__(self, data: torch.Tensor, batch_size: int, pad: bool):
        self.data, self.batch_size, self.pad, self.pos = data, batch_size, pad, 0

    def __iter__(self):
        return self

    def __next__(self):
        idx = [(self.pos + i) % len(self.data) for i in range(self.batch_size)]
        self.pos += self.batch_size
        w = self.data[idx]  # (B, T+1)
        labels = w[:, 1:].clone()
        if self.pad:
            for r, i in enumerate(idx):
                labels[r, SEQ - (i * 7) % (SEQ - 1):] = -100  # 1..SEQ-1 real targets, row-dependent
        return {"input_ids": w[:, :-1], "labels": labels}

    def state_dict(self):
        return {"pos": self.pos}

    def load_state_dict(self, state):
        self.pos = state["pos"]


class Synthetic(CausalLM):
    """CausalLM scored as usual, fed from an in-memory token table instead of shards (hermetic)."""

    def __init__(self, cfg, pad=False, n_rows=64, seed=0):
        super().__init__(cfg, None)
        g = torch.Generator().manual_seed(seed)
        self.data = {s: torch.randint(0, cfg.model.vocab_size, (n_rows, SEQ + 1), generator=g)
                     for s in ("train", "val")}
        self.pad = pad

    def stream(self, split, batch_size, seed, rank=0, world_size=1):
        return ListStream(self.data[split], batch_size, self.pad)


def tiny_cfg(tmp_path, **train) -> RunConfig:
    model = ModelConfig(vocab_size=96, max_seq_len=SEQ, n_layer=2, n_head=2, d_model=32,
                        dropout=train.pop("dropout", 0.0))
    base = dict(out_dir=str(tmp_path / "run"), dtype="fp32", device="cpu", batch_size=2, grad_accum=1,
                max_steps=6, warmup_steps=2, lr=3e-3, min_lr=3e-4, eval_every=0, eval_steps=2,
                save_every=100, log_every=1, keep_last=2, tensorboard=False)
    base.update(train)
    return RunConfig(model=model, data=DataConfig(seq_len=SEQ), train=TrainConfig(**base))


def make_trainer(cfg, pad=False, init_seed=0):
    torch.manual_seed(init_seed)
    return Trainer(cfg, GPT(cfg.model), Synthetic(cfg, pad=pad), progress=False)


def test_accumulation_equals_one_big_batch_with_uneven_padding(tmp_path):
    cfg = tiny_cfg(tmp_path)
    trainer = make_trainer(cfg, pad=True)
    reference = copy.deepcopy(trainer.model)
    stream = trainer.objective.stream("train", 3, 0)
    micro = [next(stream) for _ in range(3)]  # 3 micro-batches of 3 rows
    counts = [int((b["labels"] != -100).sum()) for b in micro]
    assert len(set(counts)) == 3, counts  # uneven on purpose

    loss_sum, total, done = trainer.accumulate(micro)
    assert done == 3 and total == sum(counts)

    # outside reference: one forward on the concatenated batch, mean cross-entropy over scored targets
    big = {k: torch.cat([b[k] for b in micro]) for k in micro[0]}
    logits = reference(big["input_ids"])
    ref_loss = F.cross_entropy(logits.flatten(0, 1), big["labels"].flatten(), ignore_index=-100)
    ref_loss.backward()
    assert abs(loss_sum.item() / total - ref_loss.item()) < 1e-6
    ref_grads = dict(reference.named_parameters())
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name].grad, atol=1e-6, rtol=0, msg=name)

    # the naive alternative (mean of per-micro-batch means) gives measurably different gradients here
    naive = copy.deepcopy(reference)
    naive.zero_grad()
    sum(F.cross_entropy(naive(b["input_ids"]).flatten(0, 1), b["labels"].flatten(), ignore_index=-100)
        for b in micro).div(3).backward()
    gap = max((p.grad - ref_grads[n].grad).abs().max().item() for n, p in naive.named_parameters())
    assert gap > 1e-4


def test_fit_writes_run_dir_and_logs(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=8, save_every=3, eval_every=4, tensorboard=True, keep_last=2)
    trainer = make_trainer(cfg)
    out = trainer.fit()
    run = tmp_path / "run"
    records = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    train_recs = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_recs] == list(range(1, 9))
    assert [r["lr"] for r in train_recs] == pytest.approx([lr_at(s, cfg.train) for s in range(8)])
    assert train_recs[-1]["loss"] < train_recs[0]["loss"]  # it learns the repeated windows
    assert all(r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1 for r in train_recs)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert out["val_ppl"] == pytest.approx(torch.tensor(out["val_loss"]).exp().item())
    # keep-last-2 of {3, 6, 8}; final weights also at top level, loadable by the store
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-000006", "step-000008"]
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.startswith(".")]
    loaded = load_model(run)
    for (n, a), b in zip(trainer.model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), n
    assert (run / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert list((run / "tb").glob("events.out.tfevents.*"))
    assert "seed: " in (run / "run.yaml").read_text()


def test_fit_refuses_a_run_dir_with_another_runs_checkpoints(tmp_path):
    """The Python path keeps the CLI's rule: a new run never lands on top of an old one's checkpoints."""
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    run = tmp_path / "run"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    with pytest.raises(TrainingError, match="already holds a run's checkpoints; fit\\(resume=True\\)"):
        make_trainer(cfg).fit()
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before
    make_trainer(tiny_cfg(tmp_path, max_steps=3, save_every=1)).fit(resume=True)  # continuing is fine


def test_trainer_refuses_a_tokenizer_larger_than_the_model(tmp_path):
    from lmforge.errors import ConfigError

    class Tok:
        vocab_size = 200

    cfg = tiny_cfg(tmp_path)  # vocab_size 96
    with pytest.raises(ConfigError, match="model.vocab_size=96 is smaller than the tokenizer's 200 tokens"):
        Trainer(cfg, GPT(cfg.model), Synthetic(cfg), Tok(), progress=False)


def test_trainer_takes_a_tokenizer_exactly_the_size_of_the_model(tmp_path):
    """vocab_size = the tokenizer's size is what the error tells users to pass; one id short is refused."""
    from lmforge.errors import ConfigError

    class Tok:
        vocab_size = 96

    cfg = tiny_cfg(tmp_path)  # vocab_size 96
    Trainer(cfg, GPT(cfg.model), Synthetic(cfg), Tok(), progress=False)
    Tok.vocab_size = 97
    with pytest.raises(ConfigError, match="model.vocab_size=96 is smaller than the tokenizer's 97 tokens"):
        Trainer(cfg, GPT(cfg.model), Synthetic(cfg), Tok(), progress=False)


class NaNAfter(Synthetic):
    """Returns a NaN loss from the `bad_call`-th loss() call on."""

    def __init__(self, cfg, bad_call):
        super().__init__(cfg)
        self.calls, self.bad_call = 0, bad_call

    def loss(self, model, batch):
        self.calls += 1
        loss_sum, n = super().loss(model, batch)
        return (loss_sum * float("nan") if self.calls >= self.bad_call else loss_sum), n


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=10, save_every=2, grad_accum=2)
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(cfg.model), NaNAfter(cfg, bad_call=10), progress=False)  # step 5, micro 2
    expected = r"diverged at step 5: loss is nan; last good checkpoint: .*step-000004; .* and --resume$"
    with pytest.raises(TrainingError, match=expected):
        trainer.fit()
    run = tmp_path / "run"
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-000002", "step-000004"]
    state = ck.load_state(run / "checkpoints" / "step-000004")
    assert state["step"] == 4
    assert all(torch.isfinite(t).all() for t in ck.load_weights(run / "checkpoints" / "step-000004").values())
    assert not (run / "model.safetensors").exists()  # no "final" weights from a diverged run


def test_a_stop_inside_a_cycle_that_went_nan_writes_no_checkpoint(tmp_path):
    """A stop after a NaN micro-batch must not save the poisoned partial cycle as the newest checkpoint
    (every --resume would put the NaN grads back); it fails as a diverged run, naming the last good one."""
    cfg = tiny_cfg(tmp_path, max_steps=10, save_every=2, grad_accum=3, keep_last=1)
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(cfg.model), NaNAfter(cfg, bad_call=13), progress=False)  # step 5, micro 1
    trainer.should_stop = lambda step, micro: step == 4 and micro == 2
    expected = r"diverged at step 5: loss is nan; last good checkpoint: .*step-000004"
    with pytest.raises(TrainingError, match=expected):
        trainer.fit()
    run = tmp_path / "run"
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-000004"]
    make_trainer(tiny_cfg(tmp_path, max_steps=6, save_every=2, grad_accum=3, keep_last=1)).fit(resume=True)


def test_a_stop_inside_a_cycle_with_inf_grads_writes_no_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=10, save_every=2, grad_accum=3)
    torch.manual_seed(0)
    trainer = make_trainer(cfg)
    real_loss = trainer.objective.loss
    calls = []

    def inf_grad(model, batch):  # finite loss, infinite gradient in the 2nd micro-batch of step 3
        calls.append(1)
        loss_sum, n = real_loss(model, batch)
        if len(calls) == 8:  # backward adds this micro-batch's gradient to an infinite one
            w = next(model.parameters())
            w.grad = torch.full_like(w, float("inf"))
        return loss_sum, n

    trainer.objective.loss = inf_grad
    trainer.should_stop = lambda step, micro: step == 2 and micro == 2
    expected = r"diverged at step 3: grad norm is inf; last good checkpoint: .*step-000002"
    with pytest.raises(TrainingError, match=expected):
        trainer.fit()
    assert [p.name for p in ck.list_checkpoints(tmp_path / "run")] == ["step-000002"]


def test_nan_before_any_checkpoint_says_to_start_again(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=10, save_every=5)
    trainer = Trainer(cfg, GPT(cfg.model), NaNAfter(cfg, bad_call=2), progress=False)
    with pytest.raises(TrainingError, match="no checkpoint was written; .* run again with --overwrite$"):
        trainer.fit()


def test_tokens_per_s_leaves_out_the_first_step(tmp_path):
    """The first step compiles kernels (seconds); the first logged tokens/s measures the steps after it."""
    cfg = tiny_cfg(tmp_path, max_steps=3, log_every=3)
    trainer = make_trainer(cfg)
    real_loss, calls = trainer.objective.loss, []

    def slow_first(model, batch):
        calls.append(1)
        if len(calls) == 1:
            time.sleep(1.0)  # stands in for compiling
        return real_loss(model, batch)

    trainer.objective.loss = slow_first
    out = trainer.fit()
    tokens_of_3_steps = 3 * cfg.train.batch_size * SEQ
    assert out["step"] == 3 and out["tokens_per_s"] > tokens_of_3_steps / 1.0  # impossible with the sleep


def test_max_time_stops_gracefully_with_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=50, max_time=0.0)
    trainer = make_trainer(cfg)
    trainer.fit()
    run = tmp_path / "run"
    assert trainer.step == 1
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-000001"]
    assert (run / "model.safetensors").exists()


def test_bf16_autocast_and_activation_checkpointing_train(tmp_path):
    cfg = tiny_cfg(tmp_path, dtype="bf16", activation_checkpointing=True, max_steps=3)
    trainer = make_trainer(cfg)
    assert trainer.model.gradient_checkpointing
    out = trainer.fit()
    assert out["step"] == 3 and torch.isfinite(torch.tensor(out["loss"]))
    assert all(p.dtype == torch.float32 for p in trainer.model.parameters())  # master weights stay fp32


# ---------------------------------------------------------------------------------------------
# `lmforge pretrain` end to end on real shards (tokenizer -> prepare -> pretrain -> load)


def shard_docs() -> list[str]:
    words = "the quick brown fox jumps over a lazy dog while seven wise owls sing héllo 世界".split()
    g = torch.Generator().manual_seed(0)
    return [" ".join(words[int(i)] for i in torch.randint(0, len(words), (60,), generator=g))
            for _ in range(80)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    from lmforge import tokenizer as tk
    from lmforge.data.prepare import prepare

    root = tmp_path_factory.mktemp("data")
    docs = shard_docs()
    tk.train("bpe", docs, vocab_size=300).save(root / "tok" / "tokenizer.json")
    prepare([], root / "tok" / "tokenizer.json", root / "shards", documents=docs, val_fraction=0.2,
            progress=False)
    return root / "shards"


def pretrain_cli(*args):
    from lmforge.cli import main

    return main(["pretrain", "gpt-tiny", "--no-progress", "--train.max_steps=4", "--train.eval_every=2",
                 "--train.tensorboard=false", "--train.device=cpu", *map(str, args)])  # later ones win


def test_pretrain_cli_end_to_end(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    model = load_model(out)
    assert model.cfg.vocab_size == 320 and (out / "tokenizer.json").exists()
    evals = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln]
    # bits per byte = nats / ln 2 / bytes, with bytes decoded from the evaluated targets
    last = evals[-1]
    assert last["val_bpb"] == pytest.approx(last["val_loss"] / math.log(2) / last["val_bytes_per_token"])
    bpt = last["val_bytes_per_token"]
    assert bpt > 1.0 and bpt < 10.0
    assert "done: step=4" in capsys.readouterr().out
    # an existing run is not overwritten by accident; --resume continues it
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 2
    assert "exists and is not empty; pass --resume" in capsys.readouterr().err
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--resume",
                        "--train.max_steps=6") == 0
    assert "note: resuming with changed settings: train.max_steps=6 (was 4)" in capsys.readouterr().err
    # flags that contradict each other are refused, not resolved silently
    assert pretrain_cli("--data.shards", shards, "--out", out, "--train.out_dir", tmp_path / "other",
                        "--resume") == 2
    assert "disagrees with" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # argparse: not allowed with
        pretrain_cli("--data.shards", shards, "--out", out, "--resume", "--overwrite")
    assert "not allowed with argument" in capsys.readouterr().err


def test_pretrain_cli_vocab_too_small_is_one_line(shards, tmp_path, capsys):
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "r", "--model.vocab_size=100") == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--model.vocab_size=300" in err and err.startswith("error:")


def test_pretrain_cli_needs_shards(tmp_path, capsys):
    assert pretrain_cli("--out", tmp_path / "r") == 2
    assert "--data.shards" in capsys.readouterr().err


def test_overwrite_keeps_the_old_run_when_the_new_one_cannot_start(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    before = sorted(p.name for p in out.iterdir())
    # the objective / model mismatch is only found when the model is built: nothing may be deleted before
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--overwrite",
                        "--objective", "mlm") == 2
    assert "error: " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    # ... nor before the data is known to suit the objective (BPE shards have no [MASK] for mlm)
    from lmforge.cli import main
    assert main(["pretrain", "bert-tiny", "--objective", "mlm", "--data.shards", str(shards), "--out",
                 str(out), "--model.vocab_size=320", "--overwrite", "--no-progress"]) == 2
    assert "error: " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == before
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--overwrite",
                        "--train.max_steps=2") == 0
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 2


def _fail_at_call(monkeypatch, n):
    """From the n-th accumulate() call on (1 = the first step), the step fails as bad data would."""
    from lmforge.errors import DataError

    real, calls = Trainer.accumulate, []

    def accumulate(self, *args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            raise DataError("token id 9999 in the shards is beyond the tokenizer; re-run `lmforge prepare`")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Trainer, "accumulate", accumulate)


def test_a_run_that_fails_before_its_first_checkpoint_leaves_out_as_it_was(shards, tmp_path, capsys,
                                                                           monkeypatch):
    """--overwrite moves the old run aside until the new one has a checkpoint; a new run dir that got no
    checkpoint (run.yaml, metrics.jsonl, tb/ only) does not stay behind to block the next attempt."""
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    _fail_at_call(monkeypatch, 1)
    capsys.readouterr()
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--overwrite") == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: token id 9999")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    new, empty = tmp_path / "new", tmp_path / "empty"
    empty.mkdir()
    for folder in (new, empty):
        assert pretrain_cli("--data.shards", shards, "--out", folder, "--model.vocab_size=320",
                            "--train.tensorboard=true") == 2
    assert not new.exists() and list(empty.iterdir()) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "run"]  # no aside copy left either
    monkeypatch.undo()
    assert pretrain_cli("--data.shards", shards, "--out", new, "--model.vocab_size=320") == 0


def test_overwrite_keeps_the_new_run_once_it_wrote_a_checkpoint(shards, tmp_path, capsys, monkeypatch):
    """A new run that fails after a checkpoint (like a diverged one) is kept: its error says --resume."""
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    _fail_at_call(monkeypatch, 3)
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--overwrite",
                        "--train.save_every=1") == 2
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000001", "step-000002"]
    assert max(json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_data_unfit_for_the_objective_leaves_no_run_dir(shards, tmp_path, capsys):
    from lmforge.cli import main

    out = tmp_path / "new"  # BPE shards have no [MASK]: mlm fails when its stream is built
    assert main(["pretrain", "bert-tiny", "--objective", "mlm", "--data.shards", str(shards), "--out",
                 str(out), "--model.vocab_size=320", "--no-progress"]) == 2
    assert "[MASK]" in capsys.readouterr().err and not out.exists()


def test_an_out_path_under_a_file_is_one_line(shards, tmp_path, capsys):
    (tmp_path / "afile").write_text("not a folder")
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "afile" / "run",
                        "--model.vocab_size=320") == 2
    last = capsys.readouterr().err.splitlines()[-1]  # after the run's banner line
    assert last.startswith("error: Not a directory") and "afile" in last, last


def test_clm_with_an_encoder_config_is_one_line(shards, tmp_path, capsys):
    from lmforge.cli import main

    code = main(["pretrain", "bert-tiny", "--objective", "clm", "--data.shards", str(shards), "--out",
                 str(tmp_path / "r"), "--model.vocab_size=320", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "objective clm trains a decoder" in err
    assert not (tmp_path / "r").exists()


def test_resume_survives_a_torn_metrics_line(shards, tmp_path):
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    with (out / "metrics.jsonl").open("a") as f:
        f.write('{"step": 5, "loss": 8.1, "lr')  # killed mid-write
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--resume",
                        "--train.max_steps=6") == 0
    steps = [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_resume_survives_undecodable_bytes_in_metrics(tmp_path):
    """A damaged metrics.jsonl (bytes that are not UTF-8) loses only the damaged line on --resume."""
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    metrics = tmp_path / "run" / "metrics.jsonl"
    with metrics.open("ab") as f:
        f.write(b"\xff\xfe\n")
    cfg.train.max_steps = 3
    make_trainer(cfg).fit(resume=True)
    steps = [json.loads(ln)["step"] for ln in metrics.read_text(encoding="utf-8").splitlines()]
    assert steps == sorted(steps) and steps[-1] == 3 and steps.count(1) == 1


@pytest.mark.parametrize("name, text", [("config.json", '{"family": "gp'),
                                        ("generation_config.json", '{"eos_token_id": "</s>"}')])
def test_cli_resume_sets_a_corrupt_newest_checkpoint_aside(shards, tmp_path, capsys, name, text):
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2") == 0
    (out / "checkpoints" / "step-000004" / name).write_text(text)
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2", "--resume", "--train.max_steps=6") == 0
    err = capsys.readouterr().err
    assert "moved the corrupt step-000004 aside" in err and "resuming from" in err and "step 2" in err
    assert [p.name for p in sorted((out / "checkpoints").iterdir())] == [  # keep_last=2 pruned step 2
        "step-000004", "step-000004.corrupt", "step-000006"]


def test_resume_refuses_shards_of_another_tokenizer_and_a_finished_run(shards, tmp_path, capsys):
    from lmforge import tokenizer as tk
    from lmforge.data.prepare import prepare

    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    # the same documents through another tokenizer: the windows may even line up, the ids do not
    docs = shard_docs()
    tk.train("bpe", docs, vocab_size=290).save(tmp_path / "tok2" / "tokenizer.json")
    prepare([], tmp_path / "tok2" / "tokenizer.json", tmp_path / "other", documents=docs,
            val_fraction=0.2, progress=False)
    capsys.readouterr()
    assert pretrain_cli("--data.shards", tmp_path / "other", "--out", out, "--model.vocab_size=320",
                        "--resume", "--train.max_steps=6") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"is not the tokenizer {out} was trained with" in err
    # a run already at train.max_steps: nothing to do is said, not done (no second final eval line)
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--resume") == 2
    assert "is at step 4 and train.max_steps=4: nothing to train" in capsys.readouterr().err
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_bits_per_byte_counts_characters_cut_between_windows():
    """Byte-level BPE: the bytes of the targets are exact even when a window ends mid-character."""
    from lmforge import tokenizer as tk
    from lmforge.config import load_config

    text = "日本語のテキスト、中文字符 and émojis 🙂 " * 20
    tok = tk.train("bpe", [text] * 5, vocab_size=300)
    ids = tok.encode(text)
    assert tok.decode(ids[:7]).endswith("\ufffd")  # a window edge inside a character
    obj = CausalLM(load_config("gpt-tiny"), tok)
    rows = [ids[i:i + 7] for i in range(0, len(ids), 7)]
    rows[-1] += [-100] * (7 - len(rows[-1]))  # unscored padding
    stats = obj.eval_stats({"labels": torch.tensor(rows)})
    got = obj.metrics(stats, loss_sum=math.log(2) * 100, n_targets=len(ids))
    true_bytes = len(text.encode("utf-8"))
    assert got["bpb"] == pytest.approx(100 / true_bytes)
    assert got["bytes_per_token"] == pytest.approx(true_bytes / len(ids))


def test_init_from_starts_a_new_run_from_another_runs_weights(shards, tmp_path, capsys):
    from lmforge import tokenizer as tk

    src, new = tmp_path / "src", tmp_path / "new"
    assert pretrain_cli("--data.shards", shards, "--out", src, "--model.vocab_size=320",
                        "--model.n_layer=1") == 0
    # lr 0: the new run's weights stay exactly the source's; its model comes from src/config.json
    assert pretrain_cli("--data.shards", shards, "--out", new, "--init-from", src, "--train.lr=0",
                        "--train.min_lr=0", "--train.max_steps=1", "--model.dropout=0.2") == 0
    a, b = load_model(src), load_model(new)
    assert b.cfg.n_layer == 1 and b.cfg.dropout == 0.2
    pairs = zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    assert all(torch.equal(x, y) for x, y in pairs)
    assert yaml.safe_load((new / "run.yaml").read_text())["config"]["train"]["init_from"] == str(src)
    capsys.readouterr()
    # bad input: a model key the source fixes, a tokenizer the shards were not made with, no such dir
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "x", "--init-from", src,
                        "--model.n_layer=2") == 2
    assert "fixes model.n_layer=1; drop --model.n_layer=2" in capsys.readouterr().err
    tk.train("bpe", ["other words entirely"] * 20, vocab_size=280).save(src / "tokenizer.json")
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "y", "--init-from", src) == 2
    assert "prepared with another tokenizer" in capsys.readouterr().err
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "z", "--init-from",
                        tmp_path / "nope") == 2
    assert f"{tmp_path / 'nope'} does not exist; give a run dir" in capsys.readouterr().err
    assert not any((tmp_path / d).exists() for d in "xyz")


def test_eval_reads_a_small_val_split_once(tmp_path):
    """eval_steps x batch_size = 8 rows but val holds 5 windows: the loss is over those 5, each once."""
    rng = np.random.default_rng(0)
    root = tmp_path / "shards"
    tokens = {"train": rng.integers(0, 96, 40 * SEQ + 1), "val": rng.integers(0, 96, 5 * SEQ + 1)}
    meta = {"version": 1, "dtype": "uint16", "vocab_size": 96, "splits": {}}
    for split, toks in tokens.items():
        (root / split).mkdir(parents=True)
        toks.astype("<u2").tofile(root / split / "shard-00000.bin")
        meta["splits"][split] = {"tokens": len(toks), "documents": 1, "shards": [f"{split}/shard-00000.bin"]}
    (root / "meta.json").write_text(json.dumps(meta))
    cfg = tiny_cfg(tmp_path, batch_size=2, eval_steps=4, max_steps=1)  # the final eval only
    cfg.data.shards = str(root)
    torch.manual_seed(0)
    trainer = Trainer(cfg, GPT(cfg.model), CausalLM(cfg, None), progress=False)
    out = trainer.fit()
    w = torch.from_numpy(tokens["val"].astype(np.int64)).unfold(0, SEQ + 1, SEQ)  # (5, SEQ + 1) windows
    with torch.no_grad():
        ref = F.cross_entropy(trainer.model(w[:, :-1]).flatten(0, 1), w[:, 1:].flatten())
    assert out["val_loss"] == pytest.approx(ref.item(), rel=1e-6)


# ---------------------------------------------------------------------------------------------
# `lmforge eval`: the Trainer's scoring, standalone


def eval_cli(*args, capsys=None):
    from lmforge.cli import main

    code = main(["eval", *map(str, args)])
    return code, (capsys.readouterr() if capsys is not None else None)


def test_eval_cli_scores_every_val_window_once_like_an_outside_reference(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    capsys.readouterr()
    code, io = eval_cli(out, "--data", shards, "--dtype", "fp32", "--batch-size", 3, "--json", capsys=capsys)
    assert code == 0, io.err
    got = json.loads(io.out)
    # outside reference: F.cross_entropy over the val stream cut into windows, each once
    from lmforge.data.loader import TokenStream
    from lmforge.tokenizer import Tokenizer

    model, tok = load_model(out).eval(), Tokenizer.load(out)
    T = model.cfg.max_seq_len
    stream = TokenStream(shards, "val")
    n_win = (len(stream) - 1) // T
    w = torch.from_numpy(stream[0: n_win * T + 1].astype(np.int64))
    x, y = w[:-1].view(n_win, T), w[1:].view(n_win, T)
    with torch.no_grad():
        ref = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="sum").item()
    n_bytes = len(tok.decode(y.flatten().tolist(), skip_special_tokens=True).encode("utf-8"))
    assert got["targets"] == n_win * T
    assert got["loss"] == pytest.approx(ref / (n_win * T), rel=1e-5)
    assert got["bpb"] == pytest.approx(ref / math.log(2) / n_bytes, rel=1e-5)
    # the endless train stream is read once too (a watchdog turns a hang into a failure)
    import signal

    before = signal.signal(signal.SIGALRM, lambda *_: pytest.fail("eval --split train did not end"))
    signal.alarm(60)
    try:
        code, io = eval_cli(out, "--data", shards, "--split", "train", "--json", capsys=capsys)
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, before)
    assert code == 0 and json.loads(io.out)["targets"] == (len(TokenStream(shards, "train")) - 1) // T * T
    assert json.loads(io.out)["split"] == "train" and got["split"] == "val"  # --json names the split scored
    # the line form, and the Trainer's own last eval reproduced with its batch size / eval_steps / dtype
    code, io = eval_cli(out, "--data", shards, "--max-batches", "20", capsys=capsys)
    assert code == 0 and io.out.startswith(f"{out} on {shards} val: loss ") and "bpb" in io.out
    last = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if "val_loss" in ln][-1]
    run = yaml.safe_load((out / "run.yaml").read_text())["config"]["train"]
    code, io = eval_cli(out, "--data", shards, "--batch-size", run["batch_size"], "--max-batches",
                        run["eval_steps"], "--dtype", run["dtype"], "--json", capsys=capsys)
    assert json.loads(io.out)["loss"] == pytest.approx(last["val_loss"], rel=1e-6)


def test_eval_cli_bad_input_is_one_line(shards, tmp_path, capsys):
    from lmforge import tokenizer as tk

    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    capsys.readouterr()
    from lmforge.data.prepare import prepare

    other = tk.train("bpe", ["some other text entirely, with other merges"] * 20, vocab_size=280)
    other.save(tmp_path / "other" / "tokenizer.json")
    prepare([], tmp_path / "other" / "tokenizer.json", tmp_path / "foreign2", progress=False,
            documents=["some other text entirely"] * 50, val_fraction=0.2)
    cases = [
        (["--data", tmp_path / "foreign2"], "was prepared with another tokenizer"),
        (["--data", tmp_path / "nowhere"], "nowhere"),
        (["--data", shards, "--seq-len", "4096"], "longer than the model's context"),
        (["--data", shards, "--objective", "mlm"], "use --objective clm"),
        (["--data", shards, "--split", "test"], "has no split 'test'"),
        (["--data", shards, "--batch-size", "0"], "--batch-size must be >= 1"),
        (["--data", shards, "--max-batches", "0"], "--max-batches must be >= 1"),
        (["--data", shards, "--seed", "-1"], "--seed must be >= 0"),
        (["--data", shards, "--objective", "nsp"], "--objective 'nsp' is not one of: clm, mlm, mlm,nsp"),
    ]
    for extra, message in cases:
        code, io = eval_cli(out, *extra, capsys=capsys)
        err = io.err.strip()
        assert code == 2 and err.count("\n") == 0 and err.startswith("error:"), (extra, err)
        assert message in err, (extra, err)


# ---------------------------------------------------------------------------------------------
# mutation-audit additions: what the optimizer step really does, stops, metrics, precision


def _spy_on_steps(trainer):
    """Record, at each optimizer.step(), every group's lr and the global norm of the grads it applies."""
    seen, real = [], trainer.optimizer.step

    def step(*args, **kwargs):
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        seen.append(([g["lr"] for g in trainer.optimizer.param_groups], norm))
        return real(*args, **kwargs)

    trainer.optimizer.step = step
    return seen


def test_every_optimizer_step_runs_at_the_scheduled_lr(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=6, warmup_steps=2, schedule="cosine")
    trainer = make_trainer(cfg)
    seen = _spy_on_steps(trainer)
    trainer.fit()
    assert [lrs for lrs, _ in seen] == [[pytest.approx(lr_at(s, cfg.train))] * 2 for s in range(6)]
    assert len({lrs[0] for lrs, _ in seen}) == 5  # half the peak, the peak (twice), then 3 decaying values


@pytest.mark.parametrize("clip", [0.05, 0.0])
def test_grads_are_clipped_to_grad_clip_before_the_step(tmp_path, clip):
    """The logged grad_norm is the norm before clipping; the step applies grads of norm <= grad_clip
    (0 = no clipping)."""
    cfg = tiny_cfg(tmp_path, max_steps=3, grad_clip=clip)
    trainer = make_trainer(cfg)
    seen = _spy_on_steps(trainer)
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = [json.loads(ln)["grad_norm"] for ln in lines if "grad_norm" in ln]
    assert min(logged) > 0.5  # a fresh model's gradients are far above the clip
    for raw, (_, applied) in zip(logged, seen, strict=True):
        assert applied == pytest.approx(min(raw, clip) if clip else raw, rel=1e-4)


def test_inf_grads_in_a_full_cycle_stop_the_run_at_that_step(tmp_path):
    """A finite loss with an infinite gradient: caught at that step, before AdamW writes NaN weights."""
    cfg = tiny_cfg(tmp_path, max_steps=10, save_every=2)
    trainer = make_trainer(cfg)
    real_loss, calls = trainer.objective.loss, []

    def inf_grad(model, batch):  # the single micro-batch of step 3
        calls.append(1)
        loss_sum, n = real_loss(model, batch)
        if len(calls) == 3:
            w = next(model.parameters())
            w.grad = torch.full_like(w, float("inf"))
        return loss_sum, n

    trainer.objective.loss = inf_grad
    with pytest.raises(TrainingError, match=r"diverged at step 3: grad norm is inf; last good checkpoint: "
                                            r".*step-000002"):
        trainer.fit()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_mfu_divides_by_the_configured_peak_flops(tmp_path):
    from lmforge.models.info import flops_per_token

    cfg = tiny_cfg(tmp_path, max_steps=2, peak_flops=1e9)
    trainer = make_trainer(cfg)
    trainer.fit()
    fpt = flops_per_token(trainer.model.cfg, trainer.model, SEQ)
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    recs = [r for r in recs if "mfu" in r]
    assert len(recs) == 2
    assert all(r["mfu"] == pytest.approx(r["tokens_per_s"] * fpt / 1e9) for r in recs)


def test_resume_keeps_each_steps_metrics_once(tmp_path):
    """A run killed after logging steps 3-4 but before their checkpoint: the resumed run (from step 2)
    logs 3-4 again, and metrics.jsonl then holds every step exactly once, the checkpoint's own included."""
    import shutil

    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2, keep_last=2)
    make_trainer(cfg).fit()
    shutil.rmtree(tmp_path / "run" / "checkpoints" / "step-000004")
    make_trainer(cfg).fit(resume=True)
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 3, 4]
    assert [r["step"] for r in recs if "val_loss" in r] == [4]


def test_mid_cycle_resume_logs_the_same_step_loss_as_never_stopping(tmp_path):
    """The logged loss of the cycle that was cut includes the micro-batches done before the stop."""
    def step_losses(run):
        recs = map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
        return {r["step"]: r["loss"] for r in recs if "loss" in r}

    train = dict(max_steps=3, grad_accum=3)
    make_trainer(tiny_cfg(tmp_path / "ref", **train)).fit()
    cfg = tiny_cfg(tmp_path / "cut", **train)
    first = make_trainer(cfg)
    first.should_stop = lambda step, micro: (step, micro) == (1, 2)  # 2 of step 2's 3 micro-batches done
    first.fit()
    make_trainer(cfg, init_seed=123).fit(resume=True)
    ref, got = step_losses(tmp_path / "ref" / "run"), step_losses(tmp_path / "cut" / "run")
    assert list(got) == [1, 2, 3]
    assert got == pytest.approx(ref, rel=1e-6)


@pytest.mark.parametrize("key, value", [("grad_accum", 2), ("batch_size", 3)])
def test_a_mid_cycle_checkpoint_resumes_only_with_its_cycle_shape(tmp_path, key, value):
    cfg = tiny_cfg(tmp_path, max_steps=4, grad_accum=3)
    first = make_trainer(cfg)
    first.should_stop = lambda step, micro: (step, micro) == (1, 1)
    first.fit()
    setattr(cfg.train, key, value)
    saved = getattr(tiny_cfg(tmp_path, grad_accum=3).train, key)
    with pytest.raises(ck.CheckpointError, match=rf"cannot resume step-000001-micro-1 mid-cycle with "
                                                 rf"train.{key}={value}; it was saved with {saved}"):
        make_trainer(cfg).fit(resume=True)


def test_max_time_is_checked_between_optimizer_steps_only(tmp_path):
    """The docstring's rule: max_time never cuts an accumulation cycle (a stop hook or Ctrl-C may)."""
    cfg = tiny_cfg(tmp_path, max_steps=50, max_time=0.0, grad_accum=3)
    trainer = make_trainer(cfg)
    trainer.fit()
    assert trainer.step == 1
    assert [p.name for p in ck.list_checkpoints(tmp_path / "run")] == ["step-000001"]


def test_a_run_that_reached_max_steps_does_not_say_to_resume(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, max_steps=1, max_time=0.0)  # time is up exactly when the run is done
    make_trainer(cfg).fit()
    assert "continue with --resume" not in capsys.readouterr().err


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_train_and_eval_run_under_the_configured_precision_and_mode(tmp_path, dtype):
    """train.dtype=bf16: every loss (training and the periodic eval) runs under bf16 autocast; fp32: none.
    Eval runs in eval mode, and training goes on in train mode after it."""
    cfg = tiny_cfg(tmp_path, dtype=dtype, max_steps=2, eval_every=1, eval_steps=1)
    trainer = make_trainer(cfg)
    real_loss, seen = trainer.objective.loss, []

    def spy(model, batch):
        cast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        seen.append((model.training, cast))
        return real_loss(model, batch)

    trainer.objective.loss = spy
    trainer.fit()
    cast = torch.bfloat16 if dtype == "bf16" else None
    assert seen == [(True, cast), (False, cast)] * 2


def test_evaluate_scores_max_batches_like_an_outside_reference(tmp_path):
    from lmforge.train.evaluate import evaluate

    cfg = tiny_cfg(tmp_path)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    obj = Synthetic(cfg, pad=True)
    stream = obj.stream("val", 3, 0)
    batches = [next(stream) for _ in range(3)]
    out = evaluate(model, obj, iter(batches), torch.device("cpu"), "fp32", max_batches=2)
    assert model.training  # put back in the mode it came in
    x = torch.cat([b["input_ids"] for b in batches[:2]])
    y = torch.cat([b["labels"] for b in batches[:2]])
    with torch.no_grad():
        ref = F.cross_entropy(model.eval()(x).flatten(0, 1), y.flatten(), ignore_index=-100)
    assert out["targets"] == int((y != -100).sum())
    assert out["loss"] == pytest.approx(ref.item(), rel=1e-6)
    assert out["ppl"] == pytest.approx(math.exp(ref.item()), rel=1e-6)


def test_evaluate_puts_a_model_in_eval_mode_back_in_eval_mode(tmp_path):
    """evaluate() restores the mode the model came in: an eval-mode model (loaded for inference, dropout
    off) stays in eval mode, a training one goes back to training."""
    from lmforge.train.evaluate import evaluate

    cfg = tiny_cfg(tmp_path, dropout=0.1)
    torch.manual_seed(0)
    model = GPT(cfg.model).eval()
    obj = Synthetic(cfg)
    batches = [next(obj.stream("val", 2, 0))]
    assert evaluate(model, obj, iter(batches), torch.device("cpu"), "fp32")
    assert not model.training and not any(m.training for m in model.modules())
    evaluate(model.train(), obj, iter(batches), torch.device("cpu"), "fp32")
    assert model.training


def test_bits_per_byte_of_a_decoded_tokenizer_leaves_out_special_tokens():
    """WordPiece has no byte table: targets are decoded, and [CLS] / [SEP] stand for no bytes."""
    from lmforge import tokenizer as tk
    from lmforge.config import load_config

    tok = tk.train("wordpiece", ["the cat sat on the mat"] * 20, vocab_size=60)
    assert tok.byte_lengths() is None
    obj = CausalLM(load_config("gpt-tiny"), tok)
    labels = torch.tensor([[tok.cls_id, *tok.encode("the cat sat"), tok.sep_id, -100]])
    assert obj.eval_stats({"labels": labels}) == {"bytes": len(b"the cat sat")}


def test_bits_per_byte_of_a_decoded_tokenizer_counts_utf8_bytes_not_characters():
    """No byte table: the decoded targets are measured in UTF-8 bytes (euro 3, em dash 3, sharp s 2)."""
    from lmforge import tokenizer as tk
    from lmforge.config import load_config

    tok = tk.train("wordpiece", ["the cat costs 5€ — ok ß"] * 20, vocab_size=60)
    assert tok.byte_lengths() is None
    obj = CausalLM(load_config("gpt-tiny"), tok)
    ids = tok.encode("the cat costs 5€ — ok ß")
    text = tok.decode(ids, skip_special_tokens=True)
    assert text == "the cat costs 5€ — ok ß"
    stats = obj.eval_stats({"labels": torch.tensor([ids + [-100]])})
    assert stats == {"bytes": len(text.encode("utf-8"))} and stats["bytes"] == len(text) + 5
    got = obj.metrics(stats, loss_sum=math.log(2) * 10, n_targets=len(ids))
    assert got["bpb"] == pytest.approx(10 / stats["bytes"])


def test_bits_per_byte_byte_table_skips_unscored_positions():
    """-100 positions count no bytes, also when id 0 is a real token (GPT-2's id 0 is '!', 1 byte)."""
    class ByteTableTok:
        def byte_lengths(self):
            return [1, 2, 3, 4]  # id i stands for i + 1 bytes

    from lmforge.config import load_config

    obj = CausalLM(load_config("gpt-tiny"), ByteTableTok())
    labels = torch.tensor([[0, 3, -100], [2, -100, -100]])
    assert obj.eval_stats({"labels": labels}) == {"bytes": 1 + 4 + 3}


def test_pretrain_cli_out_dir_rules(shards, tmp_path, capsys):
    """--resume needs a run with checkpoints; --overwrite replaces only a run dir; an empty folder is new."""
    from lmforge.cli import main

    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "none", "--model.vocab_size=320",
                        "--resume") == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --resume: ") and "has no checkpoints/" in err and err.count("\n") == 1
    assert not (tmp_path / "none").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "mine", "--model.vocab_size=320",
                        "--overwrite") == 2
    err = capsys.readouterr().err
    assert "does not look like a run dir" in err and err.count("\n") == 1
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty folder needs no --overwrite; without --no-progress: a bar
    assert main(["pretrain", "gpt-tiny", "--data.shards", str(shards), "--out", str(tmp_path / "empty"),
                 "--model.vocab_size=320", "--train.max_steps=2", "--train.tensorboard=false",
                 "--train.device=cpu"]) == 0
    assert (tmp_path / "empty" / "model.safetensors").is_file() and "train: 100%|" in capsys.readouterr().err


def test_pretrain_cli_refuses_data_settings_that_do_not_fit_before_making_a_run_dir(shards, tmp_path, capsys):
    from lmforge import tokenizer as tk
    from lmforge.config import load_config

    other = tk.train("bpe", ["some other text entirely"] * 20, vocab_size=280)
    other.save(tmp_path / "other" / "tokenizer.json")
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "a", "--model.vocab_size=320",
                        "--data.tokenizer", tmp_path / "other" / "tokenizer.json") == 2
    err = capsys.readouterr().err
    assert f"is not the tokenizer {shards} was prepared with" in err and err.count("\n") == 1, err
    context = load_config("gpt-tiny").model.max_seq_len
    assert pretrain_cli("--data.shards", shards, "--out", tmp_path / "b", "--model.vocab_size=320",
                        f"--data.seq_len={context + 1}") == 2
    err = capsys.readouterr().err
    assert f"pass --data.seq_len={context}" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_resume_notes_every_changed_train_setting(shards, tmp_path, capsys):
    from lmforge.config import load_config

    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    capsys.readouterr()
    lr = load_config("gpt-tiny").train.lr
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--resume",
                        "--train.max_steps=6", f"--train.lr={lr / 2}") == 0
    note = next(ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("note: resuming"))
    assert note == (f"note: resuming with changed settings: train.max_steps=6 (was 4), "
                    f"train.lr={lr / 2!r} (was {lr!r})")


def test_runs_with_the_same_seed_start_from_the_same_weights(shards, tmp_path, capsys):
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):  # lr 0: the saved weights are the initial ones
        assert pretrain_cli("--data.shards", shards, "--out", tmp_path / name, "--model.vocab_size=320",
                            f"--train.seed={seed}", "--train.lr=0", "--train.min_lr=0",
                            "--train.max_steps=1") == 0
    a, b, c = (load_model(tmp_path / name).state_dict() for name in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)
    assert "%|" not in capsys.readouterr().err  # --no-progress: no bar


def test_resume_checks_the_tokenizer_of_the_newest_checkpoint(shards, tmp_path, capsys):
    """Without a top-level tokenizer.json, the run's tokenizer is its newest checkpoint's."""
    from lmforge import tokenizer as tk

    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2") == 0
    (out / "tokenizer.json").unlink()
    other = tk.train("bpe", ["some other text entirely"] * 20, vocab_size=280)
    ckpts = out / "checkpoints"
    own = (ckpts / "step-000004" / "tokenizer.json").read_bytes()
    other.save(ckpts / "step-000004" / "tokenizer.json")
    capsys.readouterr()
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2", "--resume", "--train.max_steps=6") == 2
    assert f"is not the tokenizer {out} was trained with" in capsys.readouterr().err
    (ckpts / "step-000004" / "tokenizer.json").write_bytes(own)
    other.save(ckpts / "step-000002" / "tokenizer.json")  # an older checkpoint's does not decide
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2", "--resume", "--train.max_steps=6") == 0


@pytest.mark.parametrize("exc, code", [(OSError(28, "No space left on device"), 2),
                                       (KeyboardInterrupt(), 130)], ids=["enospc", "ctrl-c"])
def test_a_checkpoint_save_that_fails_is_one_line_and_the_previous_one_resumes(shards, tmp_path, capsys,
                                                                               monkeypatch, exc, code):
    """The disk fills (or Ctrl-C lands) while step-000004 is written: one line, exit 2 (130), nothing
    half-written that a resume would take, and --resume goes on from step-000002."""
    out = tmp_path / "run"
    real, calls = torch.save, []

    def save(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    rc = pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--train.save_every=2")
    monkeypatch.undo()
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == code and err[-1] in ("interrupted", "error: No space left on device; check the path, its "
                                      "permissions and free disk space"), err
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000002"]  # no .tmp-* either
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2", "--resume") == 0
    assert "resuming from" in capsys.readouterr().err
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000002", "step-000004"]


def test_cli_resume_with_no_readable_checkpoint_is_one_line(shards, tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2") == 0
    for ckpt, name in zip(ck.list_checkpoints(out), ("model.safetensors", ck.STATE_FILE)):
        (ckpt / name).write_bytes(b"")
    capsys.readouterr()
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--resume",
                        "--train.max_steps=6") == 2
    err = capsys.readouterr().err.splitlines()
    assert err[-1].startswith("error: no readable checkpoint") and "Traceback" not in "".join(err), err
    assert sum(ln.startswith("error: ") for ln in err) == 1, err
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000002", "step-000004"]  # nothing renamed


def test_trainer_refuses_a_window_longer_than_the_model_before_writing_anything(tmp_path):
    """The API path (load_config -> make_objective -> Trainer) checks what `lmforge pretrain` checks."""
    from lmforge.errors import ConfigError

    cfg = tiny_cfg(tmp_path)
    cfg.data.seq_len = 2 * SEQ
    with pytest.raises(ConfigError, match=f"data.seq_len={2 * SEQ} is longer than model.max_seq_len={SEQ}; "
                                          f"pass --data.seq_len={SEQ}"):
        make_trainer(cfg)
    assert not (tmp_path / "run").exists()


def test_trainer_refuses_a_tokenizer_the_shards_were_not_prepared_with(tmp_path):
    import dataclasses

    from lmforge.errors import DataError
    from lmforge.tokenizer import train

    ours = train("bpe", ["the cat sat on the mat " * 20], vocab_size=270, min_frequency=1)
    theirs = train("bpe", ["a dog ran in the fog " * 20], vocab_size=270, min_frequency=1)
    root = tmp_path / "shards"
    (root / "train").mkdir(parents=True)
    np.zeros(4 * SEQ, dtype="<u2").tofile(root / "train" / "shard-00000.bin")
    (root / "meta.json").write_text(json.dumps({
        "version": 1, "dtype": "uint16", "vocab_size": 270, "tokenizer_hash": theirs.hash,
        "splits": {"train": {"tokens": 4 * SEQ, "documents": 1, "shards": ["train/shard-00000.bin"]}}}))
    cfg = tiny_cfg(tmp_path)
    cfg.model, cfg.data.shards = dataclasses.replace(cfg.model, vocab_size=300), str(root)
    with pytest.raises(DataError, match="the tokenizer is not the one .* was prepared with"):
        Trainer(cfg, GPT(cfg.model), CausalLM(cfg, ours), ours, progress=False)
    Trainer(cfg, GPT(cfg.model), CausalLM(cfg, theirs), theirs, progress=False)  # its own: fine
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------
# logging writes on a full disk: metrics.jsonl, TensorBoard events, loss.png

ENOSPC = OSError(errno.ENOSPC, "No space left on device")
FULL = "error: No space left on device; check the path, its permissions and free disk space"


class _FullDisk(io.RawIOBase):
    """A file on a disk with `room` bytes left: a short write, then `exc` (ENOSPC) on every write after."""

    def __init__(self, path, room, exc=ENOSPC):
        self.f, self.room, self.exc = open(path, "ab", buffering=0), room, exc

    def writable(self):
        return True

    def write(self, b):
        if self.room <= 0:
            raise self.exc
        n = self.f.write(bytes(b[: self.room]))
        self.room -= n
        return n

    def close(self):
        self.f.close()
        super().close()


def _tb_threads():
    return [t for t in threading.enumerate() if type(t).__module__.startswith("tensorboard.")]


@pytest.mark.parametrize("exc, code, last", [(ENOSPC, 2, FULL), (KeyboardInterrupt(), 130, "interrupted")],
                         ids=["enospc", "ctrl-c"])
def test_metrics_jsonl_on_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(
        shards, tmp_path, capsys, monkeypatch, exc, code, last):
    """metrics.jsonl takes the step-2 eval line, then its disk fills (or Ctrl-C lands) in the step-4 line:
    one line, step-000002 kept (step 4's was not written yet), TensorBoard closed all the same, and
    --resume drops the torn line and finishes."""
    out, real_open = tmp_path / "run", Path.open

    def open_(self, mode="r", *args, **kwargs):
        if self.name == "metrics.jsonl" and mode == "a":
            return io.TextIOWrapper(io.BufferedWriter(_FullDisk(self, 200, exc)), encoding="utf-8")
        return real_open(self, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_)
    before = set(_tb_threads())
    rc = pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                      "--train.save_every=2", "--train.tensorboard=true")
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert rc == code and err.splitlines()[-1] == last and "Traceback" not in err, err
    assert set(_tb_threads()) <= before  # the TensorBoard writer was closed too, not left running
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000002"]
    assert not (out / "metrics.jsonl").read_text().endswith("\n")  # torn by the full disk
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2", "--resume") == 0
    assert [json.loads(ln)["step"] for ln in (out / "metrics.jsonl").read_text().splitlines()] == [2, 4, 4]
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000002", "step-000004"]


# RecordWriter.write: 1 = the event file's header, 2-5 = the step-2 eval scalars, 6-11 = step 4's train ones
@pytest.mark.parametrize("n, kept", [(2, None), (6, ["step-000002"])], ids=["step-2-eval", "step-4-train"])
def test_a_tensorboard_write_on_a_full_disk_is_one_line_and_the_last_checkpoint_resumes(
        shards, tmp_path, capsys, monkeypatch, fail_nth, n, kept):
    """TensorBoard writes in a thread of its own; its full disk stops the run all the same, at the step it
    happened (before that step's checkpoint), with one line: no thread traceback on stderr."""
    from tensorboard.summary.writer.record_writer import RecordWriter

    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)  # as outside pytest
    fail_nth(RecordWriter, "write", n, ENOSPC)
    out = tmp_path / "run"
    rc = pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                      "--train.save_every=2", "--train.tensorboard=true")
    err = capsys.readouterr().err
    assert rc == 2 and err.splitlines()[-1] == FULL, err
    assert "Traceback" not in err and "Exception in thread" not in err, err
    assert threading.excepthook is threading.__excepthook__  # put back after the run
    monkeypatch.undo()
    if kept is None:  # failed before the first checkpoint: no half-made run dir
        assert not out.exists()
        return
    assert [p.name for p in ck.list_checkpoints(out)] == kept
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320",
                        "--train.save_every=2", "--resume") == 0
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000002", "step-000004"]


def test_a_tensorboard_folder_that_cannot_be_made_is_one_line(shards, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    (out / "tb").write_text("a file where TensorBoard's folder goes")
    monkeypatch.setattr(threading, "excepthook", threading.__excepthook__)
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--resume",
                        "--train.max_steps=6", "--train.tensorboard=true") == 2
    assert capsys.readouterr().err.splitlines()[-1] == (f"error: File exists: {out / 'tb'}; check the path, "
                                                        "its permissions and free disk space")
    assert threading.excepthook is threading.__excepthook__
    assert [p.name for p in ck.list_checkpoints(out)] == ["step-000004"]


@pytest.mark.parametrize("exc, code", [(ENOSPC, 0), (KeyboardInterrupt(), 130)], ids=["enospc", "ctrl-c"])
def test_loss_png_that_cannot_be_written_keeps_the_old_one_and_the_checkpoints(shards, tmp_path, capsys,
                                                                               monkeypatch, exc, code):
    """loss.png is drawn last: a full disk there is a one-line warning, not a failed run; Ctrl-C is
    Ctrl-C. Either way the old loss.png stays, no temp file is left and the new checkpoint is whole."""
    out = tmp_path / "run"
    assert pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320") == 0
    old_png = (out / "loss.png").read_bytes()
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
        if Path(dst).name == "loss.png":
            raise exc
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", replace)
    capsys.readouterr()
    rc = pretrain_cli("--data.shards", shards, "--out", out, "--model.vocab_size=320", "--resume",
                      "--train.max_steps=6")
    monkeypatch.undo()
    err = capsys.readouterr().err.splitlines()
    if code == 0:
        warning = "warning: loss.png not written (OSError: [Errno 28] No space left on device)"
        assert rc == 0 and warning in err, err
    else:
        assert rc == 130 and err[-1] == "interrupted"
    assert (out / "loss.png").read_bytes() == old_png
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no .loss.png.*.tmp
    ckpt, state, _ = ck.latest_good(out)
    assert ckpt.name == "step-000006" and state["step"] == 6


def test_evaluate_outside_fit_scores_without_writing_and_after_fit_too(tmp_path):
    """Trainer.evaluate() in a notebook: before fit() and after it (its log closed) it returns the same
    val scores fit() logged, and writes no run dir of its own."""
    cfg = tiny_cfg(tmp_path)
    trainer = make_trainer(cfg)
    before = trainer.evaluate()
    assert set(before) >= {"val_loss", "val_ppl"} and not (tmp_path / "run").exists()
    trainer.fit()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    after = trainer.evaluate()
    assert after == {k: v for k, v in json.loads(lines[-1]).items() if k != "step"}
    assert (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() == lines  # nothing appended


def test_tensorboard_scalars_are_metrics_jsonl_under_train_and_val_tags(tmp_path):
    """What TensorBoard shows is metrics.jsonl: train/KEY and val/KEY (val_ prefix dropped), same steps, same
    values (read back with tensorboard's own EventAccumulator)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=4, eval_every=2, tensorboard=True)
    make_trainer(cfg).fit()
    run = tmp_path / "run"
    want: dict[str, list] = {}
    for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()):
        for k, v in r.items():
            if k != "step":
                tag = "val/" + k[4:] if k.startswith("val_") else "train/" + k
                want.setdefault(tag, []).append((r["step"], v))
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    got = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}
    assert {"train/loss", "train/lr", "val/loss", "val/ppl"} <= set(got) and set(got) == set(want)
    for tag, points in want.items():
        assert [s for s, _ in got[tag]] == [s for s, _ in points], tag
        assert [v for _, v in got[tag]] == pytest.approx([v for _, v in points], rel=1e-6), tag
