"""The training loop: the step plus its hooks (levanter's `Trainer.add_hook`, big_vision's evaluators).

    loop = Loop(run, watch=watch, signals=signals, last_checkpoint=describe)
    loop.add_hook(hooks.Statistics(every=500, total=steps))
    loop.add_hook(hooks.LogMetrics(...))
    loop.add_sink(metrics_log.write)          # every record a hook emits (train, eval, event)
    state = loop.run(state, start, stop_at)

Each iteration dispatches step t (the statistics variant when a hook asks for it), then calls every hook
that is due, in the order they were added. The device is asynchronous: a hook that needs the state as it
is now (evaluation, checkpoints) calls `loop.sync(state)`, which first lets every hook with pending device
values read them (the metrics of the previous log step: the loop dispatches step t before it reads step
t-1's metrics, so the host waits for the device only to log, evaluate or checkpoint) and then stops the
run with NonFiniteError if the state went non-finite. A SIGINT/SIGTERM seen by `signals` stops the loop
after the hooks of the current step (the checkpoint hook saves first), with `Interrupted`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Protocol

import jax

from jaxsmooth.train.context import RunContext


class NonFiniteError(FloatingPointError):
    """Loss, gradients or parameters became NaN/Inf; the message names the first bad step."""


class Interrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM (or `stop_after`) stopped the run after saving a checkpoint."""

    def __init__(self, signum: int | None, step: int):
        super().__init__(f"stopped at step {step} (checkpoint saved)")
        self.signum, self.step = signum, step


@dataclasses.dataclass
class StepInfo:
    """What the hooks see after step `step` was dispatched.

    Attributes:
      step: updates done once this step has run (1-based, like the logged steps).
      total: the run's last step (train.steps).
      state: the new train state (on device; possibly not computed yet).
      metrics: the step's device metrics (loss, lr, grad_norm, bad_step; statistics when with_stats).
      with_stats: whether this step computed the per-layer statistics.
    """

    step: int
    total: int
    state: Any
    metrics: dict
    with_stats: bool
    _stopping: Callable[[], bool]

    @property
    def stopping(self) -> bool:
        """Whether the loop ends after this step (its last step, or a stop signal arrived)."""
        return self._stopping()


class Hook(Protocol):
    """What the loop calls. `due(info)` says whether to call the hook after a step."""

    def due(self, info: StepInfo) -> bool: ...

    def __call__(self, loop: Loop, info: StepInfo) -> None: ...


class Loop:
    """The step plus the hooks; see the module docstring.

    Args:
      run: the set-up run (compiled steps, batches, mesh); `loop.context` in the hooks.
      watch: the step watchdog (`jaxsmooth.train.watchdog.Watchdog`): told when each step starts.
      signals: the stop-signal flags (`watchdog.StopSignals`; `signals["signum"]` is set by a signal).
      last_checkpoint: a sentence about the newest checkpoint, for the messages of a stopped run.
    """

    def __init__(self, run: RunContext, *, watch, signals, last_checkpoint: Callable[[], str]):
        self.context, self.watch, self.signals = run, watch, signals
        self.last_checkpoint = last_checkpoint
        self.hooks: list[Hook] = []
        self.sinks: list[Callable[[dict], Any]] = []

    def add_hook(self, hook: Hook) -> Hook:
        """Call `hook` after every step it says is due (in the order hooks were added); returns it."""
        self.hooks.append(hook)
        return hook

    def add_sink(self, sink: Callable[[dict], Any]) -> None:
        """Send every record a hook emits to `sink` (the first sink is metrics.jsonl: a record it refuses
        as already written, returning False, goes nowhere else)."""
        self.sinks.append(sink)

    def emit(self, record: dict) -> None:
        """Hand a record (train, eval or event) to the sinks."""
        for i, sink in enumerate(self.sinks):
            if sink(record) is False and i == 0:
                return

    def sync(self, state) -> None:
        """Read every hook's pending device values, then stop if the state is non-finite.

        Raises:
          NonFiniteError naming the first bad step (before anything is saved from this state).
        """
        self.flush()
        bad = int(jax.device_get(state["bad_step"]))
        if bad >= 0:
            raise NonFiniteError(
                f"non-finite loss, gradient or parameters at step {bad}; stopped before saving. "
                f"{self.last_checkpoint()}"
            )

    def flush(self) -> None:
        """Let the hooks that hold device values (the pending metrics) read and emit them."""
        for hook in self.hooks:
            flush = getattr(hook, "flush", None)
            if flush is not None:
                flush(self)

    def run(self, state, start: int, stop_at: int):
        """Steps start + 1 .. stop_at; returns the state after the last one (synced and checked).

        Raises:
          NonFiniteError (a hook saw a non-finite loss, gradient or state), Interrupted (a stop signal).
        """
        run, total = self.context, self.context.settings.train.steps
        for step in range(start + 1, stop_at + 1):
            self.watch.beat(f"step {step}", step=step)
            x, y = run.put(*run.batcher.batch(step - 1))
            with_stats = any(getattr(h, "wants_stats", lambda s: False)(step) for h in self.hooks)
            state, metrics = run.steps[with_stats](state, x, y)  # dispatched; the hooks read it lazily
            stopping = lambda step=step: self.signals["signum"] is not None or step == stop_at
            info = StepInfo(step, total, state, metrics, with_stats, stopping)
            for hook in self.hooks:
                if hook.due(info):
                    hook(self, info)
            if self.signals["signum"] is not None:
                self.flush()
                raise Interrupted(self.signals["signum"], step)
        self.sync(state)
        return state
