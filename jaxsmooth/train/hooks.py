"""The trainer's hooks (jaxsmooth.train.loop): statistics, logging, progress, evaluation, best-validation
selection, checkpoints, and the record sinks (metrics.jsonl, TensorBoard).

The trainer adds them in this order, which is the order they run after each step:
    Statistics      asks for the statistics variant of the step every `stats_every` steps and at the end
    LogMetrics      reads the previous log step's metrics (the only routine wait for the device) and
                    emits a "train" record at step 1, every `log_every` steps, at stats steps and at the end
    ShowProgress    the progress bar / line (also a sink: it shows the train and eval records)
    Evaluate        every `eval_every` steps (and at the end when selecting): an "eval" record, and the
                    score handed to its listeners (SelectBest keeps the best validation parameters)
    SaveCheckpoint  every `checkpoint_every` steps, at the end and when the loop is stopping
Sinks: MetricsLog.write (metrics.jsonl, the record of the run) and TensorBoardSink.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import jax

from jaxsmooth.train import runlog, tblog
from jaxsmooth.train.checkpoint import Checkpoints
from jaxsmooth.train.evaluation import BestParams, evaluate, selection_score
from jaxsmooth.train.loop import Loop, NonFiniteError, StepInfo


class Statistics:
    """Per-layer statistics of the same forward pass (the step's `with_stats` variant) every `every` steps
    and at the last step (the summary reports the final profiles).

    Args:
      every: train.stats_every.
      total: train.steps.
    """

    def __init__(self, every: int, total: int):
        self.every, self.total = every, total

    def wants_stats(self, step: int) -> bool:
        """Whether step `step` computes the statistics."""
        return step % self.every == 0 or step == self.total

    def due(self, info: StepInfo) -> bool:
        """Never called after a step: the statistics travel with the step's metrics (LogMetrics logs them)."""
        return False

    def __call__(self, loop: Loop, info: StepInfo) -> None:
        """Nothing to do after the step."""


class LogMetrics:
    """ "train" records: at step 1, every `log_every` steps, at statistics steps and at the last step.

    A log step's metrics are read after the next step is dispatched (or when the loop syncs), so the host
    never waits for the device just to log. Also measures the steps per second between the first and the
    last log (compilation left out).

    Args:
      log_every: train.log_every.
      model: the model config (its alpha, residual and value path shape the host record).
    """

    def __init__(self, log_every: int, model):
        self.log_every, self.model = log_every, model
        self.pending: tuple[int, dict] | None = None  # (step, device metrics) not yet read
        self.first = self.last = None  # (step, time) of the first / last log

    def due(self, info: StepInfo) -> bool:
        """Every step (the previous log step's metrics are read now)."""
        return True

    def __call__(self, loop: Loop, info: StepInfo) -> None:
        """Read the pending metrics, then keep this step's if it is a log step."""
        self.flush(loop)
        s = info.step
        if s == 1 or s % self.log_every == 0 or s == info.total or info.with_stats:
            self.pending = (s, info.metrics)

    def flush(self, loop: Loop) -> None:
        """Read and emit the pending metrics (stop with NonFiniteError if the step went non-finite)."""
        if self.pending is None:
            return
        step, m = self.pending
        self.pending = None
        loop.watch.waiting_for(f"step {step}", step)  # steps are dispatched ahead: name the one waited for
        bad = int(jax.device_get(m["bad_step"]))
        if bad >= 0:
            raise NonFiniteError(
                f"non-finite loss, gradient or parameters at step {bad} (loss at step {step}: "
                f"{float(m['loss'])}); stopped. {loop.last_checkpoint()}"
            )
        mc = self.model
        rec = runlog.host_record(step, m, mc.alpha_beta[0], mc.residual, mc.value_norm)
        self.last = (step, time.perf_counter())
        self.first = self.first or self.last
        rec["time"] = time.time()  # wall clock (unix seconds)
        loop.emit(rec)

    @property
    def steps_per_sec(self) -> float | None:
        """Steps per second between the first and the last log of this process (None if < 2 logs)."""
        first, last = self.first, self.last
        return (last[0] - first[0]) / (last[1] - first[1]) if first and last[0] > first[0] else None


class ShowProgress:
    """The progress bar (a terminal) or one line per log (CI, pipes): a hook for the step count and a sink
    for the records.

    Args:
      progress: a runlog.Progress.
    """

    def __init__(self, progress: runlog.Progress):
        self.progress = progress

    def due(self, info: StepInfo) -> bool:
        """Every step."""
        return True

    def __call__(self, loop: Loop, info: StepInfo) -> None:
        """Advance the bar."""
        self.progress.update(info.step)

    def sink(self, record: dict) -> None:
        """Show a train record's loss, or a periodic evaluation's results."""
        if record.get("type") == "train":
            self.progress.log(record)
        elif record.get("type") == "eval" and record.get("split") != "final":
            shown = {k: v for k, v in record.items() if k not in ("type", "step", "split")}
            self.progress.message(
                f"step {record['step']}: eval " + " ".join(f"{k} {v:.4g}" for k, v in shown.items())
            )


class Evaluate:
    """Periodic evaluation on the validation split (else the test split): every `every` steps, and at the
    last step when `at_end` (model selection needs the final parameters scored too).

    Args:
      every: train.eval_every.
      max_batches: evaluate at most this many batches (0: the whole split; selection always uses 0).
      at_end: also evaluate at the last step.
      listeners: called as listener(step, score, params) after each evaluation (SelectBest).
    """

    def __init__(self, every: int, max_batches: int, *, at_end: bool, listeners: list[Callable] = ()):
        self.every, self.max_batches, self.at_end, self.listeners = (
            every,
            max_batches,
            at_end,
            list(listeners),
        )

    def due(self, info: StepInfo) -> bool:
        """Every `every` steps, and at the last step with `at_end`."""
        return info.step % self.every == 0 or (info.step == info.total and self.at_end)

    def __call__(self, loop: Loop, info: StepInfo) -> None:
        """Evaluate the state after this step and emit an "eval" record."""
        loop.sync(info.state)
        loop.watch.beat(f"the evaluation at step {info.step}", "evaluation", info.step)
        split = loop.context.eval_split
        ev = evaluate(loop.context, info.state["params"], self.max_batches, split=split)
        loop.emit({"type": "eval", "step": info.step, "split": split, **ev})
        for listener in self.listeners:
            listener(info.step, selection_score(ev, split), info.state["params"])


class SelectBest:
    """train.select=best_val: keeps the parameters of the best validation score in the workdir (an
    Evaluate listener; `BestParams` does the keeping).

    Args:
      best: the run's BestParams.
    """

    def __init__(self, best: BestParams):
        self.best = best

    def __call__(self, step: int, score: float, params) -> None:
        """Offer this evaluation's parameters."""
        self.best.offer(step, score, params)


class SaveCheckpoint:
    """A verified checkpoint every `every` steps, at the last step and when the loop is stopping (a signal
    or `stop_after`); never of a non-finite state.

    Args:
      ckpt: the run's Checkpoints.
      every: train.checkpoint_every.
      last_saved: the step of the newest checkpoint already there (the resume step), not saved again.
    """

    def __init__(self, ckpt: Checkpoints, every: int, last_saved: int):
        self.ckpt, self.every, self.last_saved = ckpt, every, last_saved

    def due(self, info: StepInfo) -> bool:
        """Every `every` steps, at the last step, and when stopping."""
        return info.step % self.every == 0 or info.step == info.total or info.stopping

    def __call__(self, loop: Loop, info: StepInfo) -> None:
        """Save the state after this step (after checking it is finite)."""
        loop.sync(info.state)  # never save a bad state
        if info.step != self.last_saved:
            loop.watch.beat(f"the checkpoint at step {info.step}", "checkpoint", info.step)
            self.ckpt.save(info.step, info.state)
            self.last_saved = info.step


class TensorBoardSink:
    """The train and eval records as TensorBoard events (a sink; only process 0 has one).

    Args:
      tb: the run's tblog.TensorBoard.
    """

    def __init__(self, tb: tblog.TensorBoard):
        self.tb = tb

    def __call__(self, record: dict) -> None:
        """Write one record's scalars (events and other records are not TensorBoard's)."""
        if record.get("type") == "train":
            self.tb.train_record(record)
        elif record.get("type") == "eval":
            self.tb.eval_record(record)
