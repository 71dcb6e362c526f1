"""Cross-check two studies' records: runs whose `jaxsmooth train` commands set the same config (the same
flags in any order; only the workdir differs) must have measured the same thing, field for field.

    python experiments/cross_check.py experiments/results/lr.jsonl experiments/results/depth.jsonl

The studies never share a run (each cell has its own workdir, keyed by its study), so a match is an
independent rerun: the depth study's depth-8 cells repeat the lr study's cells at each variant's chosen
learning rate for seeds 0 and 1.
"""

from __future__ import annotations

import sys
from pathlib import Path

from jaxsmooth.tools import study


def _config_flags(command: str) -> frozenset[str]:
    words = command.split()
    i = words.index("--workdir")
    return frozenset(words[:i] + words[i + 2 :])


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__.split("\n\n")[1].strip(), file=sys.stderr)
        return 2
    a, b = (study.read_records(Path(p)) for p in argv)
    by_flags = {_config_flags(r["command"]): r for r in a}
    pairs = [(by_flags[f], r) for r in b if (f := _config_flags(r["command"])) in by_flags]
    bad = 0
    for ra, rb in pairs:
        diffs, _ = study.compare_records(ra, rb)
        diffs = [d for d in diffs if d[0] not in ("key", "study", "tags", "command")]
        label = f"{rb['variant']} seed {rb['seed']} {rb['tags']}"
        if diffs:
            bad += 1
            print(f"DIFFERENT {label}: " + ", ".join(f"{k} {x} vs {y}" for k, x, y in diffs[:4]))
        else:
            print(f"same      {label}: test_accuracy {rb.get('test_accuracy')}")
    print(f"{len(pairs)} runs with the same config in both files; {len(pairs) - bad} identical, {bad} differ")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
