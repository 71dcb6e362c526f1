"""What a run writes as it goes: metrics.jsonl records (their TensorBoard view: hooks.TensorBoardSink),
the host-side form of the train step's device metrics, and the progress line.

metrics.jsonl holds one JSON object per line: "train" records (loss, lr, grad_norm; at stats steps the
per-layer statistics and spectra), "eval" records (one per split and step: "val", "test", "final") and
"event" records (resumes, corrupt checkpoints, divergence).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import jax
import numpy as np

from jaxsmooth import theory
from jaxsmooth.config import ModelConfig
from jaxsmooth.train import jsonl
from jaxsmooth.train import workdir as wd

# Per-layer statistics written to metrics.jsonl at stats steps (a subset of metrics.LAYER_STAT_KEYS).
LOGGED_LAYER_STATS = ("token_cosine", "hfc_lfc")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, at most one "train" record and one "eval" record per split
    ("val", "test", "final") per step. Only process 0 writes.

    Args:
      path: the file (DIR/metrics.jsonl).
      enabled: whether this process writes (process 0).
    """

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = path, enabled
        self._seen: set[tuple[str, int]] = set()  # (type, step) of the train/eval records in the file

    def truncate_after(self, step: int) -> None:
        """Keep records with step <= `step` (a resumed run re-logs the later ones identically)."""
        if not (self.enabled and self.path.exists()):
            return
        # A torn last line (the previous process was killed mid-write) goes to metrics.jsonl.torn first,
        # bytes kept, rather than vanishing in the rewrite below.
        jsonl.repair_torn_tail(self.path)
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        wd.atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
        self._seen = {(r.get("type"), r.get("step"), r.get("split")) for r in kept}

    def write(self, record: dict) -> bool:
        """Append a record.

        Args:
          record: a JSON-able dict with "type" ("train", "eval", "event") and "step".
        Returns:
          False (and nothing written) on processes other than 0 and for a train/eval record already in the
          file (e.g. the final eval of a finished run that is rerun unchanged); True otherwise.
        """
        key = (record.get("type"), record.get("step"), record.get("split"))
        if not self.enabled or (key[0] in ("train", "eval") and key in self._seen):
            return False
        self._seen.add(key)
        try:
            # On a fresh line (a torn tail is set aside first). No fsync, as before: after a crash the steps
            # logged since the last checkpoint are redone and logged again anyway.
            jsonl.append_line(self.path, record, fsync=False)
        except OSError as e:
            if wd.is_disk_full(e):  # a torn last line is set aside by the next start's truncate_after
                raise wd.disk_full_error(self.path, e) from None
            raise
        return True


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl. A torn last line from a killed writer is skipped with a
    jsonl.TornLineWarning; a damaged line before it raises jsonl.JsonlError naming the file and line."""
    return jsonl.read_jsonl(path)


def host_record(step: int, m: dict, alpha: float, residual: str = "pre_ln", value_norm: str = "rms") -> dict:
    """Device metrics of one step -> a JSON-able record (lists of floats for per-layer arrays)."""
    m = jax.device_get(m)
    rec = {"type": "train", "step": step, "loss": float(m["loss"]), "lr": float(m["lr"])}
    rec["grad_norm"] = float(m["grad_norm"])
    if "layers" in m:
        for k in LOGGED_LAYER_STATS:
            rec[k] = np.asarray(m["layers"][k], np.float64).tolist()
            rec[f"{k}_input"] = float(m["input"][k])
        if "h_LxDxD" in m:  # baseline: real parts of the complex eigenvalues, and the spectral radius
            ev_LxD = np.linalg.eigvals(np.asarray(m["h_LxDxD"], np.float64))
            m["eig_min"], m["eig_max"] = ev_LxD.real.min(axis=1), ev_LxD.real.max(axis=1)
            rec["eig_abs_max"] = np.abs(ev_LxD).max(axis=1).tolist()
        rec["eig_min"] = np.asarray(m["eig_min"], np.float64).tolist()
        rec["eig_max"] = np.asarray(m["eig_max"], np.float64).tolist()
        rec["eig_alpha"] = alpha  # eigenvalues are of H; the effective update is H / alpha (DeepNorm)
        if "m_LxDxD" in m:  # effective maps without a closed-form spectrum: complex eigenvalues here
            eff = [theory.effective_eigenvalues(mm, residual, value_norm=value_norm) for mm in m["m_LxDxD"]]
            m["eff"] = eff_summary(np.stack([e.real for e in eff]), np)
        for k, v in m["eff"].items():
            rec[f"eff_{k}"] = np.asarray(v, np.float64).tolist()
    return rec


def wrong_side(rec: dict, mcfg: ModelConfig) -> list[float] | None:
    mode = None if mcfg.spectrum is None else mcfg.spectrum.mode
    key = {"sharpen": "eff_pos_frac", "smooth": "eff_neg_frac"}.get(mode)
    return rec.get(key) if key else None


def eff_summary(re_LxD, xp) -> dict:
    """Per-layer summary of the effective maps' eigenvalues (real parts) [L, D] (xp: jnp or np): the range
    and the fractions with negative / positive real part (the wrong side is > 0 for sharpen, < 0 for
    smooth; docs/theory.md)."""
    return {"re_min": xp.min(re_LxD, axis=1), "re_max": xp.max(re_LxD, axis=1),
            "neg_frac": xp.mean((re_LxD < 0).astype(xp.float32), axis=1),
            "pos_frac": xp.mean((re_LxD > 0).astype(xp.float32), axis=1)}  # fmt: skip


class Progress:
    """tqdm bar with ETA on a terminal; a plain line per log step otherwise (e.g. CI, nohup, pipes)."""

    def __init__(self, start: int, total: int, enabled: bool):
        self.total, self.enabled, self.bar = total, enabled, None
        self.t0, self.step0 = 0.0, None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.bar.n)

    def log(self, rec: dict) -> None:
        if not self.enabled:
            return
        text = f"loss {rec['loss']:.4f} lr {rec['lr']:.2e} |g| {rec['grad_norm']:.3f}"
        if self.bar is not None:
            self.bar.set_postfix_str(text, refresh=False)
            return
        now = time.perf_counter()
        if self.step0 is None or rec["step"] <= self.step0:  # rate from the first log on (warm-up excluded)
            self.step0, self.t0 = rec["step"], now
        done, dt = rec["step"] - self.step0, now - self.t0
        rate = done / dt if dt > 0 else 0.0
        eta = (self.total - rec["step"]) / rate if rate > 0 else float("nan")
        print(
            f"step {rec['step']}/{self.total} {text} ({rate:.1f} steps/s, ETA {_fmt_time(eta)})", flush=True
        )

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else lambda s: print(s, flush=True))(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _fmt_time(s: float) -> str:
    if not math.isfinite(s):
        return "?"
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
