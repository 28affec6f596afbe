"""io.replacing: the old folder survives until the new one is complete, and what a killed run left aside
is never thrown away."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lmforge.io import replacing


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
    assert len(notes) == 2 and all("killed while replacing it; move it back" in x for x in notes)
    assert not any(str(live) in x for x in notes)
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and ".old-" in str(p)} == before
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"]
