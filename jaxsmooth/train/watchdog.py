"""A training run that cannot hang silently: a step watchdog, and stop signals that always work.

Both live on helper threads, because the main thread is exactly what hangs: a stuck XLA execution (a
deadlocked kernel, a collective waiting for a dead peer process) holds it inside C++, where Python never
runs a signal handler and never checks a flag.

- `StopSignals`: SIGINT / SIGTERM are seen by a reader thread through `signal.set_wakeup_fd` (CPython's C
  handler writes the signal number to that pipe at once, whatever the main thread is doing). The first
  sets a flag that the loop checks after each step (it saves a checkpoint, then stops); a second one exits
  the process at once (status 128 + signal), saying which checkpoint stays usable: a save cut short is
  left in a temporary directory that the next run never restores (jaxsmooth/checkpoint.py).
- `Watchdog`: the loop calls `beat(what)` whenever it starts something (a step, an evaluation, a
  checkpoint); when nothing new starts within the limit, it writes every thread's Python stack
  (faulthandler) and one line naming what is stuck to stderr and the run's log, then exits with status
  `STUCK_EXIT`. Limits: `train.step_timeout_s` > 0 is the limit for a step (evaluations and checkpoints,
  which are not steps, get 10x that); 0 turns the watchdog off; -1 (the default) scales it to the run:
  max(300 s, 100x the median step time measured so far) for a step (600 s before any was measured,
  compilation is done before the loop starts) and max(1800 s, 10x the longest one seen) for evaluations
  and checkpoints.
"""

from __future__ import annotations

import faulthandler
import os
import signal
import statistics
import sys
import threading
import time
from collections.abc import Callable

STUCK_EXIT = 124  # as coreutils' `timeout`
AUTO = -1.0


class StopSignals:
    """Context manager: `signum` is None until the first SIGINT / SIGTERM; a second exits at once.

    Args:
      last_checkpoint: returns a sentence about the last checkpoint (for the exit message); called on
        the reader thread, so it must not wait for the device.
      say: where messages go (stderr by default).
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(
        self, last_checkpoint: Callable[[], str] = lambda: "", say: Callable[[str], None] | None = None
    ):
        self.signum: int | None = None
        self._last = last_checkpoint
        self._say = say or (lambda m: print(m, file=sys.stderr, flush=True))
        self._previous: dict = {}
        self._fds: tuple[int, int] | None = None
        self._old_wakeup = -1

    def __getitem__(self, key: str):  # the loop's old dict interface: signals["signum"]
        if key != "signum":
            raise KeyError(key)
        return self.signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may install handlers; the caller's stay in place
        r, w = os.pipe()
        os.set_blocking(w, False)  # the C handler must never block
        self._fds = (r, w)
        # A Python-level handler must be installed for CPython's C handler to run (and write the pipe);
        # it does nothing itself: the reader thread decides, even while the main thread is stuck.
        self._previous = {s: signal.signal(s, lambda *_: None) for s in self.SIGNALS}
        self._old_wakeup = signal.set_wakeup_fd(w, warn_on_full_buffer=False)
        # The read end is passed in, not read from self: __exit__ may clear _fds before the thread runs.
        threading.Thread(target=self._read, args=(r,), name="jaxsmooth-signals", daemon=True).start()
        return self

    def _read(self, r: int) -> None:
        while True:
            try:
                data = os.read(r, 64)
            except OSError:
                return
            if not data:  # __exit__ closed the write end: this thread owns the read end, close it
                os.close(r)
                return
            for signum in data:
                if signum not in self.SIGNALS:
                    continue
                name = signal.Signals(signum).name
                if self.signum is None:
                    self.signum = signum
                    self._say(
                        f"{name}: stopping after the current step (a checkpoint is saved first); "
                        f"send it again to exit at once"
                    )
                else:
                    last = self._last()
                    self._say(f"second {name}: exiting now. {last}".rstrip())
                    os._exit(128 + signum)

    def __exit__(self, *exc) -> None:
        if self._fds is None:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._previous.items():
            signal.signal(s, h)
        os.close(self._fds[1])  # the reader sees EOF, closes the read end and ends
        self._fds = None


class Watchdog:
    """Exit with a report when nothing new starts in time (see the module docstring).

    Args:
      timeout_s: `train.step_timeout_s`: > 0 seconds per step, 0 off, -1 auto.
      report: called with (the one-line message, the step last started or None) before exiting (e.g. to
        write it to the run's log).
      say: where the message and the stacks go (stderr by default).
      last_checkpoint: a sentence about the last checkpoint, for the message.
      poll_s: how often the thread looks (tests use less).
      clock: monotonic seconds (tests pass a fake one).
    """

    def __init__(
        self,
        timeout_s: float,
        *,
        report: Callable[[str, int | None], None] = lambda m, step: None,
        last_checkpoint: Callable[[], str] = lambda: "",
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ):
        if (
            isinstance(timeout_s, bool)
            or not isinstance(timeout_s, int | float)
            or not (timeout_s == AUTO or timeout_s >= 0)
        ):
            raise ValueError(
                f"train.step_timeout_s={timeout_s!r}: use seconds > 0, 0 (no watchdog) or -1 "
                "(scaled to the run)"
            )
        self.timeout_s = float(timeout_s)
        self._report, self._last, self._poll, self._clock = report, last_checkpoint, poll_s, clock
        self._lock = threading.Lock()
        self._what: str | None = None
        self._step: int | None = None  # the step last started (for the report)
        self._kind = "step"
        self._since = clock()
        self._steps: list[float] = []  # measured step intervals (the last 100)
        self._longest_other = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.timeout_s != 0

    def limit(self, kind: str) -> float:
        """The current limit, in seconds, for a `kind` ("step" or anything else) of work."""
        if self.timeout_s > 0:
            return self.timeout_s if kind == "step" else 10 * self.timeout_s
        if kind == "step":
            return max(300.0, 100 * statistics.median(self._steps)) if self._steps else 600.0
        return max(1800.0, 10 * self._longest_other)

    def beat(self, what: str, kind: str = "step", step: int | None = None) -> None:
        """Something new starts: `what` (e.g. "step 12"), of `kind` "step", "evaluation" or "checkpoint",
        at training step `step` (if known)."""
        now = self._clock()
        with self._lock:
            if self._what is not None:
                elapsed = now - self._since
                if self._kind == "step":
                    self._steps = [*self._steps[-99:], elapsed]
                else:
                    self._longest_other = max(self._longest_other, elapsed)
            self._what, self._kind, self._since = what, kind, now
            self._step = step if step is not None else self._step

    def waiting_for(self, what: str, step: int | None = None) -> None:
        """Name what the loop now waits for (e.g. the results of an earlier, asynchronously dispatched
        step), without counting it as something new: the clock keeps running from the last `beat`."""
        with self._lock:
            self._what = what
            self._step = step if step is not None else self._step

    def __enter__(self) -> Watchdog:
        self._stop = threading.Event()  # re-entrant: the trainer watches the loop, then the final evaluation
        if self.enabled:
            self._thread = threading.Thread(target=self._watch, name="jaxsmooth-watchdog", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(self._poll):
            with self._lock:
                what, kind, since = self._what, self._kind, self._since
            limit = self.limit(kind)
            if what is None or self._clock() - since <= limit:
                continue
            msg = (
                f"stuck: {what} has not finished in {limit:.0f} s (train.step_timeout_s="
                f"{self.timeout_s:g}); every thread's stack follows. {self._last()}"
            ).rstrip()
            print(f"jaxsmooth train: {msg}", file=sys.stderr, flush=True)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            try:
                self._report(msg, self._step)
            finally:
                sys.stderr.flush()
                os._exit(STUCK_EXIT)
