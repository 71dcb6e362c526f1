"""Makes tests/data/pre_layout_run with jaxsmooth as it was before the package layout (commit c1983af):
a tiny digits run (dropout on, so the resumed dropout keys are checked too) stopped at step 4 with a
checkpoint (`stopped/`), and the records and final test metrics the same old code writes when it
continues that run to step 8 (`continued.json`). tests/test_migrate.py resumes `stopped/` with today's
code and compares.

    git worktree add /tmp/old c1983af
    PYTHONPATH=/tmp/old python tests/data/make_pre_layout_run.py /tmp/old OUT && cp -r OUT/stopped \
        OUT/continued.json tests/data/pre_layout_run/
"""

import importlib.util
import json
import shutil
import sys
from pathlib import Path

old_checkout, out = Path(sys.argv[1]), Path(sys.argv[2])
sys.path.insert(0, str(old_checkout))
from jaxsmooth import cli, train  # noqa: E402  (the old flat layout)

OVERRIDES = {
    "model.depth": 1, "model.d_model": 16, "model.num_heads": 2, "model.dropout": 0.1,
    "data.batch_size": 16, "data.eval_batch_size": 360, "train.log_every": 1, "train.stats_every": 4,
    "train.eval_every": 4, "train.checkpoint_every": 4, "train.max_to_keep": 1, "opt.warmup_steps": 2,
    "train.steps": 8, "train.tensorboard": False,
}  # fmt: skip


def config():
    spec = importlib.util.spec_from_file_location("digits", cli.configs_dir() / "digits.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    c = module.get_config("quick")
    for key, value in OVERRIDES.items():
        section, field = key.rsplit(".", 1)
        c[section][field] = value
    return c


run = out / "run"
try:
    train.train(config(), run, stop_after=4, verbose=False)
except train.Interrupted:
    pass
shutil.copytree(run, out / "stopped", ignore=shutil.ignore_patterns("jaxsmooth.lock"))
summary = train.train(config(), run, verbose=False)
records = [json.loads(line) for line in open(run / "metrics.jsonl")]
continued = [r for r in records if r.get("type") in ("train", "eval") and r["step"] > 4]
result = {"records": continued, "test_loss": summary["test_loss"], "test_accuracy": summary["test_accuracy"]}
(out / "continued.json").write_text(json.dumps(result, indent=1) + "\n")
