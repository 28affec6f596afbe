"""Checkpoints: weights_only-loadable state, keep-last-K, exact resume (mid-cycle too), clear errors."""

import errno
import os
import random
import shutil
import signal

import numpy as np
import pytest
import torch
from test_trainer import Synthetic, make_trainer, tiny_cfg

from lmforge.errors import CheckpointError
from lmforge.models.gpt import GPT
from lmforge.train import checkpoint as ck
from lmforge.train.trainer import Trainer


def weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def assert_bitwise(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k} differs"


def run_uninterrupted(tmp_path, **train):
    cfg = tiny_cfg(tmp_path / "ref", **train)
    trainer = make_trainer(cfg)
    trainer.fit()
    return weights(trainer.model)


def run_stopped_then_resumed(tmp_path, stop_at, **train):
    cfg = tiny_cfg(tmp_path / "cut", **train)
    first = make_trainer(cfg)
    first.should_stop = lambda step, micro: (step, micro) == stop_at
    first.fit()
    # a fresh process would build a fresh model: use another init so only the checkpoint can make it match
    second = make_trainer(cfg, init_seed=123)
    second.fit(resume=True)
    return weights(second.model), cfg


def test_resume_at_step_boundary_is_bitwise_exact(tmp_path):
    ref = run_uninterrupted(tmp_path, max_steps=6, grad_accum=2)
    got, cfg = run_stopped_then_resumed(tmp_path, (3, 0), max_steps=6, grad_accum=2)
    assert_bitwise(ref, got)
    assert (tmp_path / "cut" / "run" / "checkpoints" / "step-000006").is_dir()


def test_ctrl_c_checkpoints_raises_and_resumes_exactly(tmp_path):
    train = dict(max_steps=5, grad_accum=3, save_every=100)
    ref = run_uninterrupted(tmp_path, **train)
    cfg = tiny_cfg(tmp_path / "cut", **train)
    first = make_trainer(cfg)

    def press_ctrl_c(step, micro):
        if (step, micro) == (2, 1):
            os.kill(os.getpid(), signal.SIGINT)  # a real signal, through the Trainer's handler
        return False

    first.should_stop = press_ctrl_c
    with pytest.raises(KeyboardInterrupt):
        first.fit()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert first.step == 2
    assert [p.name for p in (tmp_path / "cut" / "run" / "checkpoints").iterdir()] == ["step-000002-micro-2"]
    second = make_trainer(cfg, init_seed=123)
    second.fit(resume=True)
    assert_bitwise(ref, weights(second.model))


def test_resume_inside_an_accumulation_cycle_is_bitwise_exact(tmp_path):
    # dropout on: the resumed run must also continue the RNG stream exactly
    train = dict(max_steps=5, grad_accum=3, dropout=0.1, save_every=100)
    ref = run_uninterrupted(tmp_path, **train)
    cfg = tiny_cfg(tmp_path / "cut", **train)
    first = make_trainer(cfg)
    first.should_stop = lambda step, micro: (step, micro) == (2, 1)  # during step 3, after micro-batch 1 of 3
    first.fit()
    assert first.step == 2
    ckpt = tmp_path / "cut" / "run" / "checkpoints" / "step-000002-micro-1"
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)  # plain data only
    assert state["micro"] == 1 and state["step"] == 2
    assert set(state["grads"]) == {n for n, _ in first.model.named_parameters()}
    assert all(g.abs().sum() > 0 for g in state["grads"].values())  # real partial gradients
    second = make_trainer(cfg, init_seed=123)
    second.fit(resume=True)
    assert second.step == 5
    assert_bitwise(ref, weights(second.model))


def test_trainer_state_holds_only_plain_data(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    path = tmp_path / "run" / "checkpoints" / "step-000002" / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    assert state["step"] == 2 and state["micro"] == 0 and state["stream"] == {"pos": 4}  # 2 steps x 2 rows
    assert {"state", "param_groups"} <= set(state["optimizer"])
    assert {"torch", "numpy", "python"} <= set(state["rng"])


def test_rng_state_round_trips_through_weights_only(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    torch.save(ck.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item())
    random.seed(9)
    np.random.seed(9)
    torch.manual_seed(9)
    ck.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == expected


def test_keep_last_k_deletes_only_older_complete_checkpoints(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=5, save_every=1, keep_last=3)
    make_trainer(cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-000003", "step-000004", "step-000005"]
    for p in root.iterdir():
        assert {f.name for f in p.iterdir()} == {"config.json", "model.safetensors", "trainer_state.pt"}


def test_resume_with_a_different_model_shape_names_the_key(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    cfg.model.n_layer = 3
    trainer = Trainer(cfg, GPT(cfg.model), Synthetic(cfg), progress=False)
    with pytest.raises(CheckpointError, match=r"model\.n_layer=2 but the config says 3") as e:
        trainer.fit(resume=True)
    assert "\n" not in str(e.value)


def test_corrupt_newest_checkpoint_falls_back_to_previous(tmp_path, capsys):
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2, keep_last=2)
    make_trainer(cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    (root / "step-000004" / "trainer_state.pt").write_bytes(b"not a zip file")
    ckpt, state, _ = ck.latest_good(tmp_path / "run")
    assert ckpt.name == "step-000002" and state["step"] == 2
    assert "step-000004" in capsys.readouterr().err
    # truncated weights count as corrupt too; with nothing readable left, the error names the file
    data = (root / "step-000002" / "model.safetensors").read_bytes()
    (root / "step-000002" / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="no readable checkpoint"):
        ck.latest_good(tmp_path / "run")


def test_resume_without_checkpoints_is_a_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume"):
        make_trainer(cfg).fit(resume=True)
    assert not (tmp_path / "run").exists()  # and no empty run dir is left behind


def test_resumed_run_after_fallback_still_finishes(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2)
    ref = make_trainer(cfg)
    ref.fit()
    expected = weights(ref.model)
    (tmp_path / "run" / "checkpoints" / "step-000004" / "model.safetensors").write_bytes(b"\x00" * 10)
    again = make_trainer(cfg, init_seed=5)
    again.fit(resume=True)  # resumes from step-000002 and redoes steps 3-4
    assert_bitwise(expected, weights(again.model))


def test_keep_last_never_prunes_the_new_checkpoint_after_a_corrupt_newer_one(tmp_path, capsys):
    """A resume that skipped a corrupt newest checkpoint must keep what it saves from then on."""
    cfg = tiny_cfg(tmp_path, max_steps=6, save_every=2, keep_last=2)
    make_trainer(cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    (root / "step-000006" / "trainer_state.pt").write_bytes(b"garbage")
    cfg.train.keep_last, cfg.train.save_every = 1, 1
    again = make_trainer(cfg, init_seed=5)
    again.should_stop = lambda step, micro: (step, micro) == (5, 0)
    again.fit(resume=True)  # from step 4; saves step 5 and stops
    names = sorted(p.name for p in root.iterdir())
    assert names == ["step-000005", "step-000006.corrupt"], names
    assert "moved the corrupt step-000006 aside" in capsys.readouterr().err
    ckpt, state, _ = ck.latest_good(tmp_path / "run")
    assert ckpt.name == "step-000005" and state["step"] == 5


def test_save_keeps_newer_checkpoints_of_an_older_run(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=1, keep_last=2)
    make_trainer(cfg).fit()
    root = tmp_path / "run" / "checkpoints"
    model = GPT(cfg.model)
    state = {"step": 1, "micro": 0}
    ck.save_checkpoint(tmp_path / "run", model, None, state, keep_last=1)  # step 1 again: nothing older
    assert sorted(p.name for p in root.iterdir()) == ["step-000001", "step-000003", "step-000004"]


def test_unreadable_config_json_is_skipped_like_other_corruption(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2, keep_last=2)
    make_trainer(cfg).fit()
    (tmp_path / "run" / "checkpoints" / "step-000004" / "config.json").write_text("")
    ckpt, state, _ = ck.latest_good(tmp_path / "run")
    assert ckpt.name == "step-000002" and state["step"] == 2


def test_checkpoints_follow_the_umask(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        make_trainer(tiny_cfg(tmp_path, max_steps=1)).fit()
    finally:
        os.umask(old)
    ckpt = tmp_path / "run" / "checkpoints" / "step-000001"
    assert ckpt.stat().st_mode & 0o777 == 0o755
    assert (ckpt / "config.json").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "run" / "run.yaml").stat().st_mode & 0o777 == 0o644


def test_checkpoint_files_reach_the_disk_before_the_folder_is_named(tmp_path, monkeypatch):
    synced, real_fsync, real_replace = [], os.fsync, os.replace

    def fsync(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    def replace(src, dst):
        synced.append(f"rename {os.fspath(src)} -> {os.fspath(dst)}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    make_trainer(tiny_cfg(tmp_path, max_steps=1)).fit()
    ckpts = tmp_path / "run" / "checkpoints"
    final = ckpts / "step-000001"
    rename = next(i for i, e in enumerate(synced) if e.startswith("rename") and e.endswith(str(final)))
    tmp = synced[rename].split(" ")[1]
    before = {os.path.relpath(e, tmp) for e in synced[:rename] if e.startswith(tmp + os.sep)}
    before = {name for name in before if not name.startswith(".")}  # temp names of atomic writes
    assert before == {p.name for p in final.iterdir()} and len(before) >= 3
    assert str(ckpts) in synced[rename + 1:]  # and the rename itself is flushed


def test_resume_follows_the_configs_optimizer_settings(tmp_path):
    """load_state_dict brings back the checkpoint's betas / eps / decay; the config (and run.yaml) wins."""
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    cfg.train.max_steps, cfg.train.weight_decay, cfg.train.beta2, cfg.train.eps = 3, 0.0, 0.99, 1e-6
    again = make_trainer(cfg)
    again.fit(resume=True)
    groups = again.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.0, 0.0]
    assert all(g["betas"] == (0.9, 0.99) and g["eps"] == 1e-6 for g in groups)
    cfg.train.max_steps, cfg.train.weight_decay = 4, 0.05
    again = make_trainer(cfg)
    again.fit(resume=True)
    assert [g["weight_decay"] for g in again.optimizer.param_groups] == [0.05, 0.0]  # 1-D params: none


@pytest.mark.parametrize("spoil", [
    lambda s: {"step": 3},
    lambda s: [s],
    lambda s: {**s, "step": "x"},
    lambda s: {**s, "micro": 1},  # mid-cycle without its partial grads
    lambda s: {**s, "optimizer": {"state": {}}},
    lambda s: {**s, "stream": {}},
    lambda s: {**s, "stream": {"epoch": 0}},  # not this stream's position (ListStream reads "pos")
    lambda s: {**s, "rng": {"torch": 1}},
    lambda s: {**s, "micro": -1, "grads": {}},  # a negative micro-batch count, even with grads beside it
    lambda s: {k: v for k, v in s.items() if k != "stream"},  # no data position at all
], ids=["no-keys", "list", "step-str", "micro-no-grads", "optimizer", "stream-empty", "stream-keys", "rng",
        "micro-negative", "no-stream"])
def test_a_malformed_trainer_state_is_set_aside_like_a_corrupt_one(tmp_path, capsys, spoil):
    """A trainer_state.pt that unpickles but lacks what resume reads is as unusable as a corrupt one."""
    cfg = tiny_cfg(tmp_path, max_steps=4, save_every=2, keep_last=2)
    make_trainer(cfg).fit()
    path = tmp_path / "run" / "checkpoints" / "step-000004" / ck.STATE_FILE
    torch.save(spoil(ck.load_state(path.parent)), path)
    capsys.readouterr()
    again = make_trainer(cfg, init_seed=5)
    again.fit(resume=True)  # from step-000002, redoing steps 3-4
    err = capsys.readouterr().err
    assert "trainer_state.pt is malformed" in err and "moved the corrupt step-000004 aside" in err, err
    assert again.step == 4
    names = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    assert names == ["step-000002", "step-000004", "step-000004.corrupt"]


def test_another_models_optimizer_state_is_a_one_line_error(tmp_path):
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    ckpt = tmp_path / "run" / "checkpoints" / "step-000002"
    state = ck.load_state(ckpt)
    other = tiny_cfg(tmp_path / "other", max_steps=2)
    other.model.n_layer = 3
    state["optimizer"] = make_trainer(other).optimizer.state_dict()
    torch.save(state, ckpt / ck.STATE_FILE)
    cfg.train.max_steps = 3
    with pytest.raises(CheckpointError, match="optimizer state in .*step-000002/trainer_state.pt does not fit"
                                              " this model") as e:
        make_trainer(cfg).fit(resume=True)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# mutation-audit additions


def test_keep_last_zero_keeps_every_checkpoint(tmp_path):
    """train.keep_last=0 (allowed by the config) prunes nothing."""
    cfg = tiny_cfg(tmp_path, max_steps=3, save_every=1, keep_last=0)
    make_trainer(cfg).fit()
    assert [p.name for p in ck.list_checkpoints(tmp_path / "run")] == ["step-000001", "step-000002",
                                                                       "step-000003"]


def test_resume_from_weights_that_lack_a_tensor_is_a_clear_error(tmp_path):
    """A checkpoint whose model.safetensors misses a tensor must not resume with that tensor's fresh init."""
    from safetensors.torch import load_file, save_file

    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    path = tmp_path / "run" / "checkpoints" / "step-000002" / "model.safetensors"
    tensors = load_file(path)
    del tensors["ln_f.bias"]
    save_file(tensors, path)
    cfg.train.max_steps = 3
    with pytest.raises(CheckpointError, match=r"step-000002/model.safetensors lacks 'ln_f.bias'"):
        make_trainer(cfg).fit(resume=True)


def test_reading_checkpoints_leaves_the_global_rng_alone(tmp_path):
    """latest_good tries each state's RNG to see that it loads; the caller's RNG streams go on unchanged."""
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()

    def draws():
        return random.random(), np.random.rand(), torch.rand(2).tolist()

    def seed():
        random.seed(7)
        np.random.seed(7)
        torch.manual_seed(7)

    seed()
    expected = draws()
    seed()
    ck.latest_good(tmp_path / "run")
    assert draws() == expected


def test_list_checkpoints_counts_folders_only(tmp_path):
    """A stray file named like a checkpoint (a copy gone wrong) is neither resumed from nor pruned."""
    cfg = tiny_cfg(tmp_path, max_steps=1)
    make_trainer(cfg).fit()
    (tmp_path / "run" / "checkpoints" / "step-000009").write_text("not a checkpoint")
    assert [p.name for p in ck.list_checkpoints(tmp_path / "run")] == ["step-000001"]
    assert ck.latest_good(tmp_path / "run")[0].name == "step-000001"


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory):
    """A finished run with step-000002 and step-000004; tests copy it."""
    root = tmp_path_factory.mktemp("two")
    make_trainer(tiny_cfg(root, max_steps=4, save_every=2, keep_last=2)).fit()
    return root / "run"


# os.replace: 1 = model.safetensors, 2 = config.json, 3 = the folder; os.fsync: 1 = first file, 5 = the tree
@pytest.mark.parametrize("exc", [ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
@pytest.mark.parametrize("module,name,n", [(os, "replace", 1), (os, "replace", 2), (os, "replace", 3),
                                           (os, "fsync", 1), (os, "fsync", 5), (torch, "save", 1)],
                         ids=["replace-weights", "replace-config", "rename-folder", "fsync-first",
                              "fsync-tree", "torch-save"])
def test_a_save_that_fails_at_any_step_leaves_the_previous_checkpoints_as_they_were(
        two_checkpoints, tmp_path, monkeypatch, fail_nth, module, name, n, exc):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    root = run / "checkpoints"
    before = {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}
    trainer = make_trainer(tiny_cfg(tmp_path, max_steps=6))
    state = {"step": 6, "micro": 0, "optimizer": trainer.optimizer.state_dict(), "stream": {"pos": 0},
             "rng": ck.rng_state()}
    fail_nth(module, name, n, exc)
    with pytest.raises(type(exc)):
        ck.save_checkpoint(run, trainer.model, None, state, keep_last=1)
    monkeypatch.undo()
    # nothing half-written under any name (no step-000006, no .step-000006.tmp-*), nothing pruned
    assert {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in root.iterdir()) == ["step-000002", "step-000004"]
    ckpt, state, _ = ck.latest_good(run)
    assert ckpt.name == "step-000004" and state["step"] == 4


@pytest.mark.parametrize("name", ["model.safetensors", ck.STATE_FILE, "config.json"])
@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_an_empty_or_truncated_file_in_the_newest_checkpoint_falls_back(two_checkpoints, tmp_path, capsys,
                                                                        name, damage):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for step, expect in (("step-000004", "step-000002"), ("step-000002", None)):
        path = run / "checkpoints" / step / name
        data = path.read_bytes()
        path.write_bytes(b"" if damage == "empty" else data[: len(data) // 2])
        if expect:
            ckpt, state, _ = ck.latest_good(run)
            assert ckpt.name == expect and state["step"] == 2
            assert name in capsys.readouterr().err
        else:  # nothing good remains: one line naming the file
            with pytest.raises(CheckpointError, match="no readable checkpoint") as e:
                ck.latest_good(run)
            assert name in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_a_truncated_tokenizer_json_in_the_newest_checkpoint_falls_back(two_checkpoints, tmp_path, damage):
    from lmforge.tokenizer import train

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    tok = train("bpe", ["the quick brown fox jumps over the lazy dog"] * 4, vocab_size=300)
    for ckpt in ck.list_checkpoints(run):
        tok.save(ckpt / "tokenizer.json")
    path = run / "checkpoints" / "step-000004" / "tokenizer.json"
    text = path.read_text()
    path.write_text("" if damage == "empty" else text[: len(text) // 2])
    ckpt, _, _ = ck.latest_good(run)
    assert ckpt.name == "step-000002"


# ---------------------------------------------------------------------------------------------
# keep-last-K pruning cut short: an older checkpoint folder missing some of its files


@pytest.mark.parametrize("left", [[], ["config.json"], [ck.STATE_FILE], ["config.json", "model.safetensors"]],
                         ids=["empty", "config-only", "state-only", "no-state"])
def test_a_half_pruned_older_checkpoint_is_passed_over_and_pruned_by_the_next_save(two_checkpoints, tmp_path,
                                                                                     capsys, left):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    half = run / "checkpoints" / "step-000002"
    for f in half.iterdir():
        if f.name not in left:
            f.unlink()
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-000002", "step-000004"]  # still listed
    ckpt, state, _ = ck.latest_good(run)  # the newest good one; the half one is not even read
    assert ckpt.name == "step-000004" and state["step"] == 4
    assert sorted(f.name for f in half.iterdir()) == sorted(left) and "warning" not in capsys.readouterr().err
    # --resume goes on from step 4; its save at step 6 (keep_last=2) removes the half one whole
    trainer = make_trainer(tiny_cfg(tmp_path, max_steps=6, save_every=2, keep_last=2))
    trainer.fit(resume=True)
    assert trainer.step == 6
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-000004", "step-000006"]


@pytest.mark.parametrize("left", [[], ["config.json"], ["config.json", "model.safetensors"]],
                         ids=["empty", "config-only", "no-state"])
def test_a_half_pruned_checkpoint_reached_after_a_corrupt_newer_one_is_a_clear_error(two_checkpoints,
                                                                                       tmp_path, left):
    """Only when every newer one is unreadable does resume get to the half-pruned one: skipped as corrupt
    like them, then the one-line 'no readable checkpoint' error; nothing renamed, nothing crashes."""
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    for f in (run / "checkpoints" / "step-000002").iterdir():
        if f.name not in left:
            f.unlink()
    (run / "checkpoints" / "step-000004" / ck.STATE_FILE).write_bytes(b"")
    with pytest.raises(CheckpointError, match="^no readable checkpoint in .*step-000004") as e:
        ck.latest_good(run)
    assert "\n" not in str(e.value)
    assert [p.name for p in ck.list_checkpoints(run)] == ["step-000002", "step-000004"]


# os.unlink inside shutil.rmtree: 1-3 = the three files of the pruned step-000002
@pytest.mark.parametrize("exc", [ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
@pytest.mark.parametrize("module, name, n", [(shutil, "rmtree", 1), (os, "unlink", 2)],
                         ids=["before-removing", "midway"])
def test_a_prune_cut_short_keeps_the_new_checkpoint_and_the_next_save_finishes_it(
        two_checkpoints, tmp_path, monkeypatch, fail_nth, module, name, n, exc):
    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run)
    root = run / "checkpoints"
    trainer = make_trainer(tiny_cfg(tmp_path, max_steps=8))

    def state(step):
        return {"step": step, "micro": 0, "optimizer": trainer.optimizer.state_dict(), "stream": {"pos": 0},
                "rng": ck.rng_state()}

    fail_nth(module, name, n, exc)
    if name == "unlink" and isinstance(exc, OSError):  # rmtree(ignore_errors=True) goes on past it
        ck.save_checkpoint(run, trainer.model, None, state(6), keep_last=2)
    else:
        with pytest.raises(type(exc)):
            ck.save_checkpoint(run, trainer.model, None, state(6), keep_last=2)
    monkeypatch.undo()
    # the new checkpoint is whole and resumed from; step-000002 may be gone, whole or half-pruned
    assert [p.name for p in ck.list_checkpoints(run)][-2:] == ["step-000004", "step-000006"]
    ckpt, loaded, _ = ck.latest_good(run)
    assert ckpt.name == "step-000006" and loaded["step"] == 6
    assert not [p for p in root.iterdir() if p.name.startswith(".")]  # no temp or aside folder
    ck.save_checkpoint(run, trainer.model, None, state(8), keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["step-000006", "step-000008"]


def test_resume_with_another_n_head_names_the_key(tmp_path):
    """n_head does not change any weight's shape (d_model does), so only the config check can catch it."""
    cfg = tiny_cfg(tmp_path, max_steps=2, save_every=1)
    make_trainer(cfg).fit()
    cfg.model.n_head = 4  # d_model 32: still divisible, every tensor the same shape
    cfg.train.max_steps = 3
    with pytest.raises(CheckpointError, match=r"model\.n_head=2 but the config says 4"):
        make_trainer(cfg).fit(resume=True)


def test_apply_weights_refuses_a_tensor_of_another_shape_even_one_that_broadcasts(tmp_path):
    """copy_ would silently broadcast a (1,) tensor over ln_f.weight: the shape check must come first."""
    from pathlib import Path

    model = GPT(tiny_cfg(tmp_path).model)
    saved = {k: v.clone() for k, v in model.state_dict().items() if k != "head.weight"}  # tied: stored once
    saved["ln_f.weight"] = torch.full((1,), 7.0)
    with pytest.raises(CheckpointError, match=r"step-000001: tensor 'ln_f.weight' is \(1,\) but the model "
                                              r"has \(32,\)"):
        ck.apply_weights(model, saved, Path("step-000001"))
    assert not torch.equal(model.ln_f.weight, torch.full((32,), 7.0))
