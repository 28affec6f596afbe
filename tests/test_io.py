"""io.replacing: the old folder survives until the new one is complete, and what a killed run left aside
is never thrown away."""

import errno
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.io import atomic_dir, atomic_write_text, replacing


def _tree(root):
    return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_replacing_keeps_the_old_folder_until_the_new_one_is_complete(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "sub" / "a.txt").write_text("old")
    with pytest.raises(RuntimeError), replacing(out):
        assert not out.exists()  # moved aside, not deleted
        out.mkdir()
        (out / "half.txt").write_text("new")
        raise RuntimeError("crash")
    assert _tree(out) == {Path("sub", "a.txt"): b"old"}
    with replacing(out):
        out.mkdir()
        (out / "b.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the aside copy is gone
    assert (out / "b.txt").read_text() == "new" and not (out / "sub").exists()


def test_an_aside_left_by_a_killed_run_is_named_and_never_deleted(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "partial.txt").write_text("half-made by the killed run")
    for pid in (_dead_pid(), os.getpid()):  # the second: a killed process that had the pid we have now
        aside = tmp_path / f".out.old-{pid}"
        aside.mkdir()
        (aside / "good.txt").write_text(f"the output before run {pid}")
    live = tmp_path / f".out.old-{os.getppid()}"  # a live process's: it is still at work, no note
    live.mkdir()
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".old-" in str(p)}

    with replacing(out):
        out.mkdir()
        (out / "new.txt").write_text("new")
    notes = [x for x in capsys.readouterr().err.splitlines() if x.startswith("note: ")]
    assert len(notes) == 2 and all("killed while replacing it; if" in x for x in notes)
    assert not any(str(live) in x for x in notes)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".old-" in str(p)} == before
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]


ENOSPC = OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("exc", [ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
@pytest.mark.parametrize("step", ["write", "fsync", "chmod", "replace"])
def test_a_failed_atomic_write_keeps_the_old_file_and_leaves_no_temp(tmp_path, monkeypatch, fail_nth, step,
                                                                     exc):
    path = tmp_path / "tokenizer.json"
    atomic_write_text(path, "old")
    if step == "write":
        real = os.fdopen
        monkeypatch.setattr(os, "fdopen", lambda fd, mode: _BrokenFile(real(fd, mode), exc))
    else:
        fail_nth(os, step, 1, exc)
    with pytest.raises(type(exc)):
        atomic_write_text(path, "new and longer")
    monkeypatch.undo()
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no .tokenizer.json.*.tmp


class _BrokenFile:
    """A file object whose write fails (a full disk) after it wrote half the data."""

    def __init__(self, f, exc):
        self.f, self.exc = f, exc

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.f.close()

    def write(self, data):
        self.f.write(data[: len(data) // 2])
        self.f.flush()
        raise self.exc


@pytest.mark.parametrize("exc", [ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
@pytest.mark.parametrize("where", ["body", "fsync", "first-rename"])
def test_atomic_dir_that_fails_before_its_rename_keeps_the_old_folder(tmp_path, monkeypatch, fail_nth, where,
                                                                      exc):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    if where == "fsync":
        fail_nth(os, "fsync", 1, exc)
    elif where == "first-rename":
        fail_nth(os, "replace", 1, exc)
    with pytest.raises(type(exc)), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
        (tmp / "b.txt").write_text("new")
        if where == "body":
            raise exc
    monkeypatch.undo()
    assert _tree(out) == {Path("a.txt"): b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no .out.tmp-* or .out.old-* left


@pytest.mark.parametrize("exc", [ENOSPC, KeyboardInterrupt()], ids=["enospc", "ctrl-c"])
def test_atomic_dir_keeps_the_old_folder_when_the_final_rename_fails(tmp_path, monkeypatch, fail_nth, exc):
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("old")
    fail_nth(os, "replace", 2, exc)  # 1: out -> .out.old-PID, 2: the new one -> out
    with pytest.raises(type(exc)), atomic_dir(out) as tmp:
        (tmp / "a.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _tree(out) == {Path("a.txt"): b"old"}


@pytest.mark.parametrize("writer", ["atomic_dir", "replacing"])
def test_ctrl_c_while_the_old_copy_is_deleted_still_deletes_it(tmp_path, monkeypatch, fail_nth, writer):
    """The new folder is in place when the old copy is deleted: a Ctrl-C then must not leave a half-deleted
    .out.old-PID, which the next run would name as a killed run's earlier output to move back."""
    out = tmp_path / "out"
    out.mkdir()
    for name in "abc":
        (out / f"{name}.txt").write_text("old")
    fail_nth(os, "unlink", 2, KeyboardInterrupt())  # in the middle of deleting the old copy's files
    with pytest.raises(KeyboardInterrupt):
        if writer == "atomic_dir":
            with atomic_dir(out) as tmp:
                (tmp / "new.txt").write_text("new")
        else:
            with replacing(out):
                out.mkdir()
                (out / "new.txt").write_text("new")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert _tree(out) == {Path("new.txt"): b"new"}
