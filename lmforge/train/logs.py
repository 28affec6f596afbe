"""What a run logs as it trains: RUN/metrics.jsonl (one JSON record per log step and per eval),
TensorBoard event files under RUN/tb (the same numbers as train/... and val/... scalars), and RUN/loss.png
(train and val loss against step), drawn when the log closes.

    log = RunLog(run_dir, step=0, resume=False, tensorboard=True)
    log.write({"step": 10, "loss": 5.1, "lr": 6e-4})
    log.close()                              # closes both writers, then draws loss.png

A write that fails (a full disk) raises at once, whichever of the two writers it hits, so the Trainer
stops at that step with one line, as a failed checkpoint save does; a loss.png that cannot be written is
only a warning. On resume, records after the checkpoint's step (and a line torn by a kill) are dropped
from metrics.jsonl, and TensorBoard purges its events after that step.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path

from lmforge.io import atomic_write_bytes, atomic_write_text


class RunLog:
    def __init__(self, run_dir: Path, step: int, resume: bool, tensorboard: bool):
        self.run_dir = run_dir
        path = run_dir / "metrics.jsonl"
        if resume and path.exists():  # forget records from after the checkpoint (and a line torn by a kill)
            # undecodable bytes (a damaged file) spoil only their line, as a torn line does
            text = path.read_text(encoding="utf-8", errors="replace")
            keep = [r for r in map(_record, text.splitlines()) if r is not None and r.get("step", 0) <= step]
            atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in keep))
        elif not resume:
            path.unlink(missing_ok=True)
        self._metrics = path.open("a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._excepthook = threading.excepthook
            threading.excepthook = _quiet_tensorboard_thread(self._excepthook)
            try:
                self._tb = SummaryWriter(str(run_dir / "tb"), purge_step=step + 1 if resume else None)
            except BaseException:  # e.g. a file named tb: nothing left open, the hook put back
                threading.excepthook = self._excepthook
                self._metrics.close()
                raise

    def write(self, record: dict[str, float]) -> None:
        """One line of metrics.jsonl and the record's TensorBoard scalars (val_x -> val/x, x -> train/x)."""
        self._metrics.write(json.dumps(record) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for key, value in record.items():
                if key != "step":
                    tag = "val/" + key[4:] if key.startswith("val_") else f"train/{key}"
                    self._tb.add_scalar(tag, value, record["step"])
            self._tb.flush()  # its writer thread's error (a full disk) is raised here, not some steps later

    def close(self) -> None:
        """Close metrics.jsonl and TensorBoard (both, also when one fails: a full disk fails the close of
        a file with data still buffered), then draw loss.png."""
        try:
            self._metrics.close()
        finally:
            if self._tb is not None:
                try:
                    self._tb.close()
                finally:
                    for thread in threading.enumerate():  # a failed writer thread: let it end quietly
                        if _is_tensorboard(thread) and getattr(thread, "exception", None) is not None:
                            thread.join(timeout=10)
                    threading.excepthook = self._excepthook
        try:
            plot_losses(self.run_dir / "metrics.jsonl", self.run_dir / "loss.png")
        except Exception as e:  # a missing plot never fails a run
            print(f"warning: loss.png not written ({e.__class__.__name__}: {e})", file=sys.stderr)


def _is_tensorboard(thread: threading.Thread) -> bool:
    return type(thread).__module__.startswith("tensorboard.")


def _quiet_tensorboard_thread(hook: Callable) -> Callable:
    """threading.excepthook less the traceback of TensorBoard's event writer thread: the writer raises
    that error again in the training thread (RunLog.write), where the CLI makes it one line."""

    def excepthook(args) -> None:
        if not (_is_tensorboard(args.thread) and issubclass(args.exc_type, Exception)):
            hook(args)

    return excepthook


def _record(line: str) -> dict | None:
    """One metrics.jsonl line as a dict; None for a blank or torn line (a run killed mid-write)."""
    try:
        r = json.loads(line)
    except ValueError:
        return None
    return r if isinstance(r, dict) else None


def plot_losses(metrics_path: Path, png_path: Path) -> None:
    """Train loss (and val loss) against step, from metrics.jsonl, to a PNG written atomically."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [r for r in map(_record, Path(metrics_path).read_text(encoding="utf-8").splitlines()) if r]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for points, label in ((train, "train"), (val, "val")):
        if points:
            ax.plot(*zip(*points), label=label, marker="o" if label == "val" else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target)")
    ax.grid(alpha=0.3)
    ax.legend()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(png_path, buf.getvalue())
