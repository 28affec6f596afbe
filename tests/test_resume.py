"""--resume continues exactly, across the settings a resume has to get right: each case stops a run (a stop
hook, Ctrl-C or train.max_time, once or several times, inside an accumulation cycle or between steps) and
resumes it with a fresh Trainer (another init, as a new process builds), then compares it with the same run
never stopped: final weights and optimizer state bitwise, and every logged loss, grad norm and lr exactly.

test_checkpoint.py has the basic cases (a step boundary, one mid-cycle stop, Ctrl-C); here: grad_accum 1 / 3
with a stop after each micro-batch, schedules with the warmup crossing the stop, active clipping, bf16 and the
fused kernels on / off, eval before the stop, dropout, max_time, pruning to keep_last=1, two stops in one run,
and on real shards the three objectives (clm, mlm, mlm,nsp: masks and NSP pairs) with the data wrapping
around an epoch between the stop and the end."""

import json
import os
import signal

import pytest
import torch
from test_checkpoint import assert_bitwise, weights
from test_mlm import synthetic_docs
from test_trainer import make_trainer, tiny_cfg

from lmforge.train import checkpoint as ck
from lmforge.train.trainer import Trainer

# ---------------------------------------------------------------------------------------------
# helpers


def optimizer_state(trainer) -> dict[str, torch.Tensor]:
    return {f"{i}.{k}": torch.as_tensor(v).clone()
            for i, s in trainer.optimizer.state_dict()["state"].items() for k, v in s.items()}


def logged(trainer) -> tuple[dict, dict]:
    """({step: (loss, grad_norm, lr)}, {step: val_loss}) from RUN/metrics.jsonl."""
    recs = [json.loads(ln) for ln in (trainer.run_dir / "metrics.jsonl").read_text().splitlines()]
    return ({r["step"]: (r["loss"], r["grad_norm"], r["lr"]) for r in recs if "loss" in r},
            {r["step"]: r["val_loss"] for r in recs if "val_loss" in r})


def install_stop(trainer, stop) -> None:
    """stop = (kind, step, micro): at should_stop(step, micro) stop (kind "hook") or press Ctrl-C ("sigint":
    a real signal through the Trainer's handler, honoured after the next micro-batch or step)."""
    kind, step, micro = stop

    def hook(s, m):
        if (s, m) != (step, micro):
            return False
        if kind == "sigint":
            os.kill(os.getpid(), signal.SIGINT)
            return False
        return True

    trainer.should_stop = hook


def stop_and_resume(build, plan) -> tuple[Trainer, list[dict]]:
    """build(init_seed, max_time) -> a Trainer of the run. plan: a list of stops (see install_stop), one per
    invocation, the run resumed after each; or "max_time": train.max_time=0, so each invocation trains one
    step and stops. Returns the Trainer that finished the run and the trainer state saved at each stop."""
    stops = [] if plan == "max_time" else list(plan)
    trainer, invocations, saved = build(0, plan == "max_time"), 0, []
    while True:
        stop = stops.pop(0) if stops else None
        if stop:
            install_stop(trainer, stop)
        try:
            trainer.fit(resume=invocations > 0)
        except KeyboardInterrupt:  # after a Ctrl-C, once the checkpoint is written
            assert stop and stop[0] == "sigint"
        invocations += 1
        if trainer.step == trainer.t.max_steps:
            break
        assert stop or plan == "max_time"
        saved.append(ck.load_state(ck.list_checkpoints(trainer.run_dir)[-1]))
        trainer = build(100 + invocations, plan == "max_time")
    assert invocations == (trainer.t.max_steps if plan == "max_time" else len(plan) + 1), "a stop never came"
    return trainer, saved


def assert_same_run(ref: Trainer, got: Trainer) -> None:
    assert_bitwise(weights(ref.model), weights(got.model))
    assert_bitwise(optimizer_state(ref), optimizer_state(got))
    ref_train, ref_val = logged(ref)
    got_train, got_val = logged(got)
    assert got_train == ref_train  # exact: every step's loss, grad norm and lr
    assert ref_val.items() <= got_val.items()  # + the val score each stopped invocation ends with


# ---------------------------------------------------------------------------------------------
# the Trainer's own settings, on the in-memory clm data of test_trainer.py


def synthetic_build(tmp_path, name, **train):
    def build(init_seed, max_time):
        cfg = tiny_cfg(tmp_path / name, **train)
        cfg.train.max_time = 0.0 if max_time else None
        return make_trainer(cfg, init_seed=init_seed)

    return build


SYNTHETIC = {  # name: (train settings, stops)
    "accum1": (dict(grad_accum=1), [("hook", 3, 0)]),
    "accum3-boundary": (dict(grad_accum=3), [("hook", 2, 0)]),
    "accum3-after-micro-2": (dict(grad_accum=3), [("hook", 2, 2)]),
    "accum3-first-cycle": (dict(grad_accum=3, dropout=0.1), [("hook", 0, 1)]),
    "cosine-warmup-clip": (dict(schedule="cosine", warmup_steps=4, grad_clip=0.05), [("hook", 2, 0)]),
    "linear-warmup-clip": (dict(schedule="linear", warmup_steps=4, grad_clip=0.05, grad_accum=2),
                           [("hook", 2, 1)]),
    "constant-warmup": (dict(schedule="constant", warmup_steps=4), [("hook", 3, 0)]),
    "bf16-fused": (dict(dtype="bf16", fused_kernels=True, grad_accum=2, dropout=0.1), [("hook", 2, 1)]),
    "bf16-eager": (dict(dtype="bf16", fused_kernels=False, grad_accum=2), [("hook", 2, 1)]),
    "fp32-eager": (dict(fused_kernels=False, grad_accum=2), [("hook", 3, 1)]),
    "stop-right-after-eval": (dict(eval_every=2, dropout=0.1), [("hook", 2, 0)]),
    "eval-then-mid-cycle": (dict(eval_every=2, grad_accum=3, dropout=0.1), [("hook", 3, 2)]),
    "ctrl-c-between-steps": (dict(dropout=0.1, eval_every=3), [("sigint", 2, 0)]),
    "max-time-every-step": (dict(dropout=0.1, eval_every=2, grad_accum=2), "max_time"),
    "keep-last-1-two-stops": (dict(keep_last=1, save_every=1, grad_accum=2, dropout=0.1),
                              [("hook", 2, 1), ("sigint", 4, 0)]),
    "two-stops-in-one-cycle": (dict(grad_accum=3, keep_last=1, dropout=0.1),
                               [("hook", 2, 1), ("hook", 2, 2)]),
}


@pytest.mark.parametrize("name", list(SYNTHETIC))
def test_resume_is_exact(tmp_path, name):
    train, plan = SYNTHETIC[name]
    ref = synthetic_build(tmp_path, "ref", **train)(0, False)
    ref.fit()
    got, _ = stop_and_resume(synthetic_build(tmp_path, "cut", **train), plan)
    assert_same_run(ref, got)
    if "grad_clip" in train:  # the clipping really acted
        assert max(g for _, g, _ in logged(ref)[0].values()) > train["grad_clip"]
    if train.get("keep_last") == 1:  # pruned to the last one at every save
        assert [p.name for p in ck.list_checkpoints(got.run_dir)] == ["step-000006"]


def _drop_grads(restore):
    def wrapped(self, stream):
        micro, grads, loss = restore(self, stream)
        return micro, {}, loss
    return wrapped


def _drop_loss(restore):
    def wrapped(self, stream):
        micro, grads, loss = restore(self, stream)
        return micro, grads, 0.0
    return wrapped


MISTAKES = {  # what a resume could forget -> how to make it forget
    "rng": lambda mp: mp.setattr(ck, "set_rng_state", lambda state: torch.manual_seed(7)),
    "optimizer": lambda mp: mp.setattr(torch.optim.AdamW, "load_state_dict", lambda self, state: None),
    "data-position": lambda mp: mp.setattr(ck, "_position_loads", lambda stream, position: True),
    "partial-grads": lambda mp: mp.setattr(Trainer, "_restore", _drop_grads(Trainer._restore)),
    "partial-loss": lambda mp: mp.setattr(Trainer, "_restore", _drop_loss(Trainer._restore)),
}


@pytest.mark.parametrize("mistake", list(MISTAKES))
def test_a_resume_that_forgets_anything_is_caught(tmp_path, monkeypatch, mistake):
    """The comparison above can fail: a resume that loses one piece of the state is not the same run."""
    train = dict(grad_accum=3, dropout=0.1, max_steps=4)
    ref = synthetic_build(tmp_path, "ref", **train)(0, False)
    ref.fit()
    build = synthetic_build(tmp_path, "cut", **train)
    first = build(0, False)
    install_stop(first, ("hook", 2, 1))
    first.fit()
    MISTAKES[mistake](monkeypatch)
    got = build(123, False)
    got.fit(resume=True)
    with pytest.raises(AssertionError):
        assert_same_run(ref, got)


# ---------------------------------------------------------------------------------------------
# the three objectives on real shards small enough that an epoch is a few steps

@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    """3 train documents (~140 tokens: 8 clm windows of 16, 10 mlm windows, ~10 NSP pairs) and 3 val ones."""
    from lmforge.data.prepare import prepare
    from lmforge.tokenizer import train

    docs = synthetic_docs(6)
    root = tmp_path_factory.mktemp("resume")
    train("wordpiece", docs * 3, vocab_size=120, min_frequency=1).save(root / "tok")
    prepare([], root / "tok", root / "shards", val_docs=3, progress=False, documents=docs)
    return root


def shards_build(root, out, objective, **train):
    from lmforge import runtime
    from lmforge.config import load_config
    from lmforge.objectives import make_objective
    from lmforge.tokenizer import Tokenizer

    tok = Tokenizer.load(root / "tok")
    model = {"vocab_size": tok.vocab_size, "n_layer": 1, "d_model": 32, "n_head": 2, "max_seq_len": 32,
             "dropout": 0.1}
    settings = {**dict(objective=objective, out_dir=str(out), device="cpu", batch_size=3, grad_accum=2,
                       max_steps=8, warmup_steps=3, eval_every=2, eval_steps=2, save_every=3, log_every=1,
                       keep_last=1, tensorboard=False, dtype="fp32"), **train}

    def build(init_seed, max_time):
        over = {"data": {"shards": str(root / "shards"), "seq_len": 16},
                "train": {**settings, "max_time": 0.0 if max_time else None}, "model": model}
        cfg = load_config("gpt-tiny" if objective == "clm" else "bert-tiny", over)
        runtime.seed_everything(init_seed)  # a fresh process builds the model after seeding, as pretrain does
        obj = make_objective(cfg, tok)
        return Trainer(cfg, obj.build_model(), obj, tok, progress=False)

    return build


def epoch_of(state: dict) -> int:
    return state["windows"]["epoch"] if "windows" in state else state["epoch"]


PLANS = {  # name: (train settings, stops); the run: 8 steps of 2 micro-batches of 3, eval every 2 steps
    "mid-cycle-then-wrap": ({}, [("hook", 4, 1)]),
    "ctrl-c-bf16": ({"dtype": "bf16"}, [("sigint", 2, 0)]),
    "max-time-every-step": ({}, "max_time"),
    "two-stops": ({"fused_kernels": False}, [("hook", 1, 1), ("hook", 5, 0)]),
}


@pytest.mark.parametrize("plan", list(PLANS))
@pytest.mark.parametrize("objective", ["clm", "mlm", "mlm,nsp"])
def test_every_objective_resumes_exactly(tiny_shards, tmp_path, objective, plan):
    """mlm masks and NSP pairs draw from generators seeded by the data position, dropout from the global RNG:
    both must continue as if the run had never stopped, across the epoch boundaries the 8 steps cross."""
    train, stops = PLANS[plan]
    ref = shards_build(tiny_shards, tmp_path / "ref", objective, **train)(0, False)
    ref.fit()
    got, saved = stop_and_resume(shards_build(tiny_shards, tmp_path / "cut", objective, **train), stops)
    assert_same_run(ref, got)
    if plan == "mid-cycle-then-wrap":  # the data wrapped around an epoch between the stop and the end
        end = ck.load_state(ck.list_checkpoints(got.run_dir)[-1])
        assert epoch_of(end["stream"]) > epoch_of(saved[0]["stream"]), (saved[0]["stream"], end["stream"])
