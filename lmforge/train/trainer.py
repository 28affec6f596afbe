"""The one training loop. Every objective (clm, mlm, mlm+nsp, later fine-tuning tasks) runs through it.

    trainer = Trainer(cfg, model, objective, tokenizer)
    trainer.fit()                 # or fit(resume=True) to continue RUN/checkpoints/ exactly

One optimizer step = one accumulation cycle of `grad_accum` micro-batches:
  1. read all micro-batches of the cycle and count their targets (`objective.count_targets`) FIRST;
  2. for each micro-batch: loss_sum, n = objective.loss(model, batch); backward(loss_sum / cycle_targets),
     so the accumulated gradient is exactly the big batch's mean-loss gradient, padding included;
  3. stop on a NaN/inf loss or grad norm (TrainingError; checkpoints on disk stay as they were);
  4. clip the global grad norm, set lr = lr_at(step), AdamW step, zero grads.

Around it: bf16 autocast (runtime.autocast), optional torch.compile, eval on the val split every
`eval_every` steps (loss, perplexity, objective extras such as bits per byte), logging (a tqdm bar with
loss, tokens/s, MFU and ETA; metrics.jsonl, TensorBoard and loss.png through train/logs.py) and
checkpoints (train/checkpoint.py). A stop request (SIGINT or the `should_stop` hook) is honoured after any
micro-batch: the checkpoint then holds the partial gradients of the cycle (when they and the partial
loss are finite; otherwise 3. applies). train.max_time is checked after each optimizer step. After a
SIGINT stop `fit` raises KeyboardInterrupt once the checkpoint is written.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from lmforge import kernels, runtime
from lmforge.config import RunConfig, save_run_yaml
from lmforge.errors import ConfigError, DataError, LmforgeError
from lmforge.models.convert_config import eos_ids
from lmforge.models.info import flops_per_token
from lmforge.objectives.base import Objective, to_device
from lmforge.train import checkpoint as ckpt_mod
from lmforge.train.evaluate import evaluate
from lmforge.train.logs import RunLog
from lmforge.train.optim import apply_hparams, build_optimizer, lr_at, set_lr


class TrainingError(LmforgeError):
    """The run cannot continue (diverged to NaN / inf) or has nothing left to do."""


class Diverged(TrainingError):
    """The loss or the grads went NaN / inf: `head` says where, `fix` what to change, `checkpoint` is the
    last good one (None when none was written); a caller that reruns differently rewords the advice."""

    def __init__(self, head: str, fix: str, checkpoint: Path | None):
        self.head, self.fix, self.checkpoint = head, fix, checkpoint
        super().__init__(f"{head}; last good checkpoint: {checkpoint}; {fix} and --resume" if checkpoint
                         else f"{head}; no checkpoint was written; {fix} and run again with --overwrite")


def check_vocab(vocab_size: int, needed: int) -> None:
    """ConfigError unless the model's embedding has a row for every id the tokenizer / shards use."""
    if vocab_size < needed:
        raise ConfigError(f"model.vocab_size={vocab_size} is smaller than the tokenizer's {needed} "
                          f"tokens; pass --model.vocab_size={needed}")


def check_seq_len(seq_len: int, max_seq_len: int) -> None:
    """ConfigError unless the training window fits the model's positions."""
    if seq_len > max_seq_len:
        raise ConfigError(f"data.seq_len={seq_len} is longer than model.max_seq_len={max_seq_len}; "
                          f"pass --data.seq_len={max_seq_len} or raise model.max_seq_len")


def check_shards_tokenizer(shards: str, tokenizer) -> None:
    """DataError when the shards' meta.json records another tokenizer than `tokenizer` (its ids would
    train on in silence); nothing to check without shards or a recorded hash."""
    from lmforge.data.prepare import load_meta

    if not shards or not (Path(shards) / "meta.json").is_file() or not hasattr(tokenizer, "hash"):
        return
    recorded = load_meta(shards).get("tokenizer_hash")
    if recorded and tokenizer.hash != recorded:
        raise DataError(f"the tokenizer is not the one {shards} was prepared with; load "
                        f"{Path(shards) / 'tokenizer.json'} or re-run `lmforge prepare` with it")


class Trainer:
    """Trainer(cfg, model, objective, tokenizer=None, out_dir=None). `out_dir` defaults to cfg.train.out_dir.

    Hooks for tests and callers: `should_stop(step, micro) -> bool` is called after every micro-batch
    (`micro` = micro-batches done in the cycle of optimizer step `step`, 0-based) and after every
    optimizer step (micro = 0, `step` = steps done); True stops the run gracefully with a checkpoint.
    """

    def __init__(self, cfg: RunConfig, model: nn.Module, objective: Objective, tokenizer=None,
                 out_dir: str | Path | None = None, progress: bool = True):
        self.cfg, self.t = cfg, cfg.train
        self.run_dir = Path(out_dir or cfg.train.out_dir)
        self.device = runtime.pick_device(self.t.device)
        self.model = model.to(self.device)
        if self.device.type == "cpu" and self.t.keep_freed_memory:
            runtime.keep_freed_memory()
        kernels.set_enabled(self.t.fused_kernels)
        self.objective = objective
        self.tokenizer = tokenizer if tokenizer is not None else getattr(objective, "tokenizer", None)
        if self.tokenizer is not None:  # before any step: an id past the table is an IndexError mid-run
            check_vocab(cfg.model.vocab_size, self.tokenizer.vocab_size)
            check_shards_tokenizer(cfg.data.shards, self.tokenizer)
        check_seq_len(objective.seq_len, getattr(model, "cfg", cfg.model).max_seq_len)
        self.progress = progress
        self.should_stop: Callable[[int, int], bool] | None = None
        self.step = 0
        self.rank, self.world_size = 0, 1
        self._interrupted = False
        self.last_eval: dict[str, float] = {}
        self._logs: RunLog | None = None  # open while fit() runs
        if self.t.activation_checkpointing:
            if not hasattr(model, "gradient_checkpointing"):
                raise TrainingError(f"{type(model).__name__} has no activation checkpointing switch; "
                                    "set --train.activation_checkpointing=false")
            model.gradient_checkpointing = True
        self.optimizer = build_optimizer(self.model, self.t)
        self.forward_model = torch.compile(self.model) if self.t.compile else self.model
        # as model info; the model as built (an mlm-only BERT has no NSP head, a headless one gains mlm)
        self.flops_per_token = flops_per_token(getattr(self.model, "cfg", cfg.model), self.model,
                                               objective.seq_len)

    # -----------------------------------------------------------------------------------------
    def fit(self, resume: bool = False) -> dict[str, float]:
        """Train to train.max_steps (or until stopped). Returns the last logged metrics."""
        t = self.t
        if not resume and ckpt_mod.list_checkpoints(self.run_dir):  # never mix two runs' checkpoints
            raise TrainingError(f"{self.run_dir} already holds a run's checkpoints; fit(resume=True) "
                                "continues it (--resume), or delete it / choose another train.out_dir")
        runtime.seed_everything(t.seed)
        # the stream first: data that does not suit the objective must not leave an empty run dir
        stream = self.objective.stream("train", t.batch_size, t.seed, self.rank, self.world_size)
        micro0, grads0, loss0 = 0, None, 0.0
        if resume:  # before mkdir too: nothing to resume must not leave an empty run dir
            micro0, grads0, loss0 = self._restore(stream)
            if self.step >= t.max_steps:
                raise TrainingError(f"{self.run_dir}'s checkpoint is at step {self.step} and train.max_steps="
                                    f"{t.max_steps}: nothing to train; raise --train.max_steps to go on")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        save_run_yaml(self.cfg, self.run_dir, {"resumed_at_step": self.step} if resume else None)
        self._logs = RunLog(self.run_dir, self.step, resume, self.t.tensorboard)
        old_handler = self._install_sigint()
        try:
            result = self._loop(stream, micro0, grads0, loss0)
        finally:
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            logs, self._logs = self._logs, None
            logs.close()
        if self._interrupted:  # the checkpoint is on disk; now behave as Ctrl-C does (the CLI exits 130)
            raise KeyboardInterrupt
        return result

    def _loop(self, stream, micro0: int, grads0, loss0: float) -> dict[str, float]:
        t, model, obj = self.t, self.model, self.objective
        model.train()
        start = time.monotonic()
        tick, tick_tokens, tick_steps = start, 0, 0
        first_step = True  # this invocation's first step compiles the fused kernels
        last: dict[str, float] = {}
        stopped = False
        with self._bar() as bar:  # closed on an error too: the error then gets a line of its own
            while self.step < t.max_steps:
                cycle_start = copy.deepcopy(stream.state_dict())
                batches = [to_device(next(stream), self.device) for _ in range(t.grad_accum)]
                if micro0:  # resumed inside this cycle: put back the partial grads of micro-batches < micro0
                    for name, p in model.named_parameters():
                        if name in grads0:
                            p.grad = grads0[name].to(self.device)
                stop = lambda done: self._stop_requested(start, self.step, done)  # noqa: B023
                loss_acc, total, done = self.accumulate(batches, micro0, loss0, stop)
                if done < len(batches):  # stopped mid-cycle: save the partial cycle, unless it diverged
                    self._check_finite(float(loss_acc) / total)
                    self._save(cycle_start, micro=done, loss_acc=float(loss_acc))
                    stopped = True
                    break
                micro0, loss0 = 0, 0.0
                loss, grad_norm, lr = self.optimizer_step(loss_acc, total)
                self.step += 1
                tick_tokens += sum(obj.n_tokens(b) for b in batches)
                tick_steps += 1
                if first_step and self.step % t.log_every and self.step < t.max_steps:
                    tick, tick_tokens = time.monotonic(), 0  # the first step compiles kernels: not in tok/s
                first_step = False

                if self.step % t.log_every == 0 or self.step == t.max_steps:
                    now = time.monotonic()
                    tps = tick_tokens / max(now - tick, 1e-9)
                    last = {"step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                            "tokens_per_s": tps, "mfu": tps * self.flops_per_token / self._peak_flops(),
                            "elapsed_s": now - start}
                    self._logs.write(last)
                    tick, tick_tokens = now, 0
                bar.update(tick_steps)
                tick_steps = 0
                if last:
                    bar.set_postfix(loss=f"{last['loss']:.3f}", tok_s=f"{last['tokens_per_s']:.0f}",
                                    mfu=f"{100 * last['mfu']:.1f}%", refresh=False)
                pause = time.monotonic()
                if t.eval_every > 0 and self.step % t.eval_every == 0:
                    self.evaluate()
                stopped = self.step < t.max_steps and self._stop_requested(start, self.step, 0)
                if self.step % t.save_every == 0 or stopped or self.step == t.max_steps:
                    self._save(stream.state_dict(), micro=0, loss_acc=0.0)
                tick += time.monotonic() - pause  # tokens/s counts training time only, not eval or saving
                if stopped:
                    break
        if self.last_eval.get("step") != self.step:  # every run ends with a val score
            self.evaluate()
        ckpt_mod.save_model_files(model, self.tokenizer, self.run_dir)  # final weights at RUN/ top level
        if stopped:
            print(f"stopped at step {self.step}; continue with --resume", file=sys.stderr)
        return {**last, **self.last_eval}

    def optimizer_step(self, loss_acc: torch.Tensor, total: int) -> tuple[float, float, float]:
        """After a full cycle: check for divergence, clip, set lr_at(step), AdamW step, zero grads.

        Returns (mean loss of the cycle, grad norm before clipping, lr used). Does not advance self.step.
        """
        t = self.t
        loss = float(loss_acc) / max(total, 1)
        self._check_finite(loss, grads=False)  # the grads: the norm clipping computes anyway
        clip = t.grad_clip if t.grad_clip > 0 else float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip))
        if not math.isfinite(grad_norm):
            raise self._diverged(f"grad norm is {grad_norm}")
        lr = lr_at(self.step, t)
        set_lr(self.optimizer, lr)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm, lr

    def _check_finite(self, loss: float, grads: bool = True) -> None:
        """TrainingError (the run diverged) on a NaN / inf loss, or on NaN / inf accumulated grads."""
        if not math.isfinite(loss):
            raise self._diverged(f"loss is {loss}")
        if grads:
            norm = float(torch.nn.utils.get_total_norm([p.grad for p in self.model.parameters()
                                                        if p.grad is not None]))
            if not math.isfinite(norm):
                raise self._diverged(f"grad norm is {norm}")

    def accumulate(self, batches: list[dict], start: int = 0, loss_acc: float = 0.0,
                   stop: Callable[[int], bool] | None = None) -> tuple[torch.Tensor, int, int]:
        """Forward + backward micro-batches `start`.. of one accumulation cycle into the params' .grad.

        Each micro-batch contributes d(loss_sum / cycle_targets), where cycle_targets counts the targets
        of ALL of `batches` (also those before `start`), so the summed gradient equals the gradient of
        the mean loss over the concatenated big batch, whatever the padding.
        `stop(done)` is asked after each micro-batch but the last; True returns early.
        Returns (summed loss of micro-batches 0..done-1 as a tensor, cycle_targets, done).
        """
        counts = [self.objective.count_targets(b) for b in batches]
        total = max(sum(counts), 1)  # the whole cycle's targets, counted FIRST
        acc = torch.tensor(float(loss_acc), device=self.device)
        for j in range(start, len(batches)):
            with runtime.autocast(self.device, self.t.dtype):
                loss_sum, n = self.objective.loss(self.forward_model, batches[j])
            assert int(n) == counts[j], "objective.loss and objective.count_targets disagree"
            (loss_sum / total).backward()
            acc += loss_sum.detach().float()
            if stop is not None and j + 1 < len(batches) and stop(j + 1):
                return acc, total, j + 1
        return acc, total, len(batches)

    # -----------------------------------------------------------------------------------------
    def evaluate(self) -> dict[str, float]:
        """Mean loss, perplexity and objective extras over the first train.eval_steps val batches (the
        same each time; a val split smaller than that is read once, not wrapped around), with a val_
        prefix, and logged while fit() runs. The scoring is `train.evaluate.evaluate`, which `lmforge eval`
        runs too."""
        t, obj = self.t, self.objective
        try:
            stream = obj.stream("val", t.batch_size, t.seed, self.rank, self.world_size)
        except LmforgeError as e:
            print(f"warning: no evaluation ({e})", file=sys.stderr)
            return {}
        scores = evaluate(self.forward_model, obj, stream, self.device, t.dtype, t.eval_steps)
        if not scores:
            return {}
        out = {f"val_{k}": v for k, v in scores.items() if k != "targets"}
        if self._logs is not None:  # evaluate() outside fit() scores without logging
            self._logs.write({"step": self.step, **out})
        self.last_eval = {**out, "step": self.step}
        return out

    # -----------------------------------------------------------------------------------------
    # stop requests, checkpoints, resume

    def _stop_requested(self, start: float, step: int, micro: int) -> bool:
        if self._interrupted:
            return True
        if self.should_stop is not None and self.should_stop(step, micro):
            return True
        return micro == 0 and self.t.max_time is not None and time.monotonic() - start > self.t.max_time

    def _install_sigint(self):
        if threading.current_thread() is not threading.main_thread():
            return None

        def handler(signum, frame):
            if self._interrupted:  # second Ctrl-C: abort now
                raise KeyboardInterrupt
            self._interrupted = True
            print("\ninterrupt: saving a checkpoint after this micro-batch (Ctrl-C again to abort)",
                  file=sys.stderr)

        return signal.signal(signal.SIGINT, handler)

    def _save(self, stream_state, micro: int, loss_acc: float) -> Path:
        state = {
            "step": self.step, "micro": micro, "optimizer": self.optimizer.state_dict(),
            "stream": stream_state, "rng": ckpt_mod.rng_state(), "loss_acc": loss_acc,
            "grad_accum": self.t.grad_accum, "batch_size": self.t.batch_size,
        }
        if micro:
            state["grads"] = {n: p.grad.detach().cpu().clone() for n, p in self.model.named_parameters()
                              if p.grad is not None}
        return ckpt_mod.save_checkpoint(self.run_dir, self.model, self.tokenizer, state, self.t.keep_last)

    def _restore(self, stream) -> tuple[int, dict | None, float]:
        # the model as built: an objective may adjust the config (mlm-only BERT drops the NSP head);
        # latest_good checks it against the checkpoint's, and loads the checkpoint's data position
        model_cfg = getattr(self.model, "cfg", self.cfg.model)
        ckpt, state, weights = ckpt_mod.latest_good(self.run_dir, stream, model_cfg)
        for key in ("grad_accum", "batch_size"):
            if state["micro"] and state.get(key) != getattr(self.t, key):
                raise ckpt_mod.CheckpointError(
                    f"cannot resume {ckpt.name} mid-cycle with train.{key}={getattr(self.t, key)}; "
                    f"it was saved with {state.get(key)}: pass --train.{key}={state.get(key)}")
        ckpt_mod.apply_weights(self.model, weights, ckpt)
        if self.tokenizer is not None and getattr(self.model, "cfg", self.cfg.model).family == "gpt":
            self.tokenizer.add_eos_ids(eos_ids(ckpt))  # e.g. an imported instruct model's end-of-turn id
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (ValueError, KeyError, TypeError) as e:  # e.g. another model's optimizer state
            raise ckpt_mod.CheckpointError(
                f"cannot resume: the optimizer state in {ckpt / ckpt_mod.STATE_FILE} does not fit this "
                f"model ({e.__class__.__name__}); resume from a checkpoint this run wrote, or start a new "
                "run with another --out") from None
        apply_hparams(self.optimizer, self.t)  # load_state_dict brought back the old betas/eps/decay
        ckpt_mod.set_rng_state(state["rng"])
        self.step = int(state["step"])
        print(f"resuming from {ckpt} (step {self.step}, micro-batch {state['micro']})", file=sys.stderr)
        return int(state["micro"]), state.get("grads"), float(state.get("loss_acc", 0.0))

    def _diverged(self, what: str) -> Diverged:
        done = ckpt_mod.list_checkpoints(self.run_dir)
        return Diverged(f"training diverged at step {self.step + 1}: {what}",
                        f"lower --train.lr (now {self.t.lr}) or raise --train.warmup_steps",
                        done[-1] if done else None)

    # -----------------------------------------------------------------------------------------
    # logging

    def _peak_flops(self) -> float:
        return self.t.peak_flops or runtime.peak_flops(self.device, self.t.dtype)

    def _bar(self):
        from tqdm.auto import tqdm

        return tqdm(total=self.t.max_steps, initial=self.step, desc="train", unit="step", dynamic_ncols=True,
                    disable=not self.progress)  # disabled: every call a no-op
