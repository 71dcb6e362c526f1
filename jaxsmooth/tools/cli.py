"""The `jaxsmooth` command: `jaxsmooth <verb> ...` (also `python -m jaxsmooth`).

    jaxsmooth train [--config FILE[:ARGS] | NAME[:ARGS]] [--workdir DIR] [--config.<field>=<value> ...]
                    [--restart] [--print_config]
                    [--coordinator_address HOST:PORT --num_processes N --process_id I]
    jaxsmooth configs          (the packaged configs, one line each)
    jaxsmooth audit ...        (jaxsmooth.tools.audit.main)

`--config` takes a config file (`path/to/x.py:quick`) or the name of a packaged config (`digits:quick`,
see `jaxsmooth train --help`); overrides follow ml_collections.config_flags (`--config.train.steps=200`,
`--config.model.spectrum.mode=smooth`). Without --config, train runs the default config (digits).
Without --workdir, the run goes to ./runs/<config.name>. Rerunning with the same workdir resumes.

Heavy imports (jax, the trainer) happen only once a verb needs them, so `--help` is instant. Every
expected failure (a bad flag or config file, an unusable or locked workdir, a config that differs from the
checkpoints', a full disk) ends with a one- or two-line message and a non-zero exit status, not a
traceback; Ctrl-C or SIGTERM outside the training loop exits at once with status 130 / 143 (inside it, the
loop saves a checkpoint first).
"""

from __future__ import annotations

import ast
import os
import re
import signal
import sys
from pathlib import Path
from typing import NoReturn

from jaxsmooth import configs
from jaxsmooth.tools.arguments import (  # noqa: F401 - the command line's parsing, named here too
    DEFAULT_CONFIG,
    UsageError,
    check_overrides,
    load_config_file,
    parse_train_args,
    parse_train_options,
    resolve_config,
)

VERBS = {
    "train": "train a model from a config (resumes in an existing workdir)",
    "configs": "list the packaged configs, one line each",
    "audit": "measure and predict per-layer smoothing of a run or a pretrained model (jaxsmooth.tools.audit)",
    "study": "run / report a study: a grid of runs with seeds and committed records (jaxsmooth.tools.study)",
    "sample": "print text sampled from a trained character LM (a run directory)",
    "convert": "convert unconstrained attention weights to spectral ones (jaxsmooth.tools.convert)",
}

TRAIN_USAGE = """usage: jaxsmooth train [--config FILE[:ARGS] | NAME[:ARGS]] [--workdir DIR] [--config.X=V]
                       [--restart] [--print_config]

  --config        a config file (path/to/x.py:quick) or a packaged config name (default: digits)
  --workdir       output and checkpoint directory (default: ./runs/<config.name>); rerun to resume
  --config.a.b=v  override one field, e.g. --config.train.steps=200 --config.model.spectrum.mode=smooth
  --restart       start over from step 0; the workdir's previous files are kept as metrics.1.jsonl, ...
  --print_config  print the resolved config and exit without training (also --dry_run)
  --coordinator_address, --num_processes, --process_id
                  multi-process run (or env JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID;
                  JAXSMOOTH_DISTRIBUTED=auto takes them from SLURM, Open MPI, ... as jax detects them)

packaged configs: {names} ('jaxsmooth configs' describes them)
"""


def configs_dir() -> Path:
    """Where the packaged configs live (`jaxsmooth.configs.directory()`)."""
    return configs.directory()


def config_names() -> list[str]:
    return configs.names()


def config_summary(path: Path, width: int = 100) -> str:
    """The first sentence of a config file's docstring (read, not executed), cut to `width` characters."""
    try:
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8"))) or ""
    except (OSError, SyntaxError, UnicodeDecodeError, ValueError):
        return "(unreadable)"
    para = " ".join(doc.split("\n\n")[0].split())
    m = re.match(r"(.+?\.)(\s|$)", para)
    text = m.group(1) if m else para
    return text if len(text) <= width else text[: width - 3].rsplit(" ", 1)[0] + " ..."


def configs_main(argv: list[str]) -> int:
    """`jaxsmooth configs`: one line per packaged config."""
    if argv:
        print("usage: jaxsmooth configs   (lists the packaged configs; no arguments)", file=sys.stderr)
        return 0 if set(argv) <= {"-h", "--help"} else 2
    names = config_names()
    width = max(map(len, names), default=0)
    for name in names:
        print(f"{name:{width}s}  {config_summary(configs_dir() / f'{name}.py')}")
    print("\nrun one: jaxsmooth train --config NAME[:quick] (args after ':' in each file's docstring)")
    return 0


def train_main(argv: list[str]) -> int:
    if any(a in ("-h", "--help", "-help") for a in argv):
        print(TRAIN_USAGE.format(names=", ".join(config_names())))
        return 0
    from absl import flags

    try:
        config, workdir, dist, options = parse_train_options(argv)
    except UsageError as e:
        print(f"jaxsmooth train: error: {e}", file=sys.stderr)
        return 2
    except (flags.Error, ValueError, KeyError, AttributeError, TypeError) as e:
        # config_flags reports a bad value as IllegalFlagValueError (a flags.Error) naming the flag.
        text = str(e) if isinstance(e, flags.Error) else f"{type(e).__name__}: {e}"
        print(f"jaxsmooth train: error: {text}\n(see 'jaxsmooth train --help')", file=sys.stderr)
        return 2

    if options["print_config"]:
        return print_config(config)

    from jaxsmooth.train import workdir as wd  # no JAX yet

    workdir = Path("runs") / config.name if workdir is None else workdir  # "" is refused by train
    # (parallel.distributed_args decides for real; this guess only skips the lock check below, jax-free.)
    maybe_multi_process = (
        dist["coordinator_address"]
        or os.environ.get("JAX_COORDINATOR_ADDRESS")
        or os.environ.get("JAXSMOOTH_DISTRIBUTED")
    )
    # Single process only: the other processes of a multi-process run see process 0 holding the lock.
    holder = wd.live_holder(workdir) if str(workdir).strip() and not maybe_multi_process else None
    if holder is not None:  # refuse before the slow imports; train() takes the lock itself
        print(f"jaxsmooth train: error: {wd.locked_message(workdir, holder)}", file=sys.stderr)
        return 1

    from jaxsmooth import data, train
    from jaxsmooth.train import checkpoint, parallel

    try:
        multi_process = parallel.initialize(**dist)
        with parallel.peer_loss_as_error():
            if multi_process:
                _say_joined()
            summary = train.train(config, workdir, restart=options["restart"])
    except parallel.PeerLostError as e:
        _exit_after_peer_loss(e, Path(workdir))
    except train.Interrupted as e:
        print(f"jaxsmooth train: {e}; rerun the same command to resume.", file=sys.stderr)
        return 128 + (e.signum or signal.SIGINT)
    except wd.WorkdirLockedError as e:
        print(f"jaxsmooth train: error: {e}", file=sys.stderr)
        return 1
    except (ValueError, data.DataNotFoundError) as e:  # config, workdir, incompatible run, damaged metadata
        print(f"jaxsmooth train: error: {e}", file=sys.stderr)
        return 2
    except (train.NonFiniteError, checkpoint.CheckpointError, wd.DiskFullError) as e:
        print(f"jaxsmooth train: error: {e.strerror if isinstance(e, OSError) else e}", file=sys.stderr)
        return 1
    print_summary(summary)
    return 0


def _say_joined() -> None:
    """One line per process of a multi-process run, at start: which process this is, and what happens when
    another one dies. The second part is for the cases where jax itself ends the process (the coordinator,
    process 0, died; or a peer went silent): its own last words are a C++ abort and a stack trace."""
    import jax

    from jaxsmooth.train import parallel

    n = jax.process_count()
    print(
        f"jaxsmooth: process {jax.process_index()} of {n}. If a process dies, the others stop: at once, or "
        f"after {parallel.heartbeat_timeout()} s without its heartbeat ({parallel.ENV_HEARTBEAT}); then "
        f"start all {n} again with the same command to resume from the last checkpoint.",
        file=sys.stderr,
        flush=True,
    )


def _exit_after_peer_loss(e: Exception, workdir: Path) -> NoReturn:
    """Report a lost peer process and exit now, with status 1.

    Not a normal return: at exit, jax's `distributed.shutdown` waits in a barrier for every process,
    including the dead one, until the coordination service declares it dead (the heartbeat timeout), and
    then aborts this process with a C++ stack trace. The trainer's own clean-up (workdir lock, open
    checkpoint writes, metrics file) already ran while the error unwound out of train()."""
    import jax

    from jaxsmooth.train import checkpoint
    from jaxsmooth.train import workdir as wd

    steps = checkpoint.step_dirs(workdir)
    last = checkpoint.describe_last(workdir / "checkpoints", steps).rstrip(".")
    then = "resume" if steps else "start over"
    print(
        f"jaxsmooth train: error: {e}. This process stops too. {last}: start all {jax.process_count()} "
        f"processes again with the same command to {then}.",
        file=sys.stderr,
        flush=True,
    )
    wd.release_all()
    sys.stdout.flush()
    os._exit(1)


def print_config(config) -> int:
    """`--print_config`: the config with every override and reference resolved, then its validation."""
    print(config)
    from jaxsmooth import train
    from jaxsmooth.train import workdir as wd

    try:
        wd.check_finite(config.to_dict())
        mcfg = train.check_config(config)
    except ValueError as e:
        print(f"jaxsmooth train: error: {e}", file=sys.stderr)
        return 2
    print(f"# model as built: {mcfg}")
    return 0


def print_summary(s: dict) -> None:
    from jax import process_index

    if process_index() != 0:
        return
    wd = Path(s["workdir"])
    lines = [f"done: {s['name']}, {s['steps']} steps"]
    if "test_accuracy" in s:
        lines.append(f"  test accuracy    {s['test_accuracy']:.4f}   (test loss {s['test_loss']:.4f})")
    else:
        lines.append(f"  test loss        {s['test_loss']:.4f} nats/char = {s['test_bpc']:.4f} bits/char")
    if s.get("token_cosine"):
        cos = s["token_cosine"]  # [L + 1]: the stack's input, then after each layer
        # Deep stacks (deep1000) show about a dozen evenly spaced layers, each labelled with its index.
        shown = (
            sorted({round(i * (len(cos) - 1) / 12) for i in range(13)}) if len(cos) > 13 else range(len(cos))
        )
        lines.append("  token cosine     " + " ".join(f"{i}:{cos[i]:.3f}" for i in shown))
        lines.append("                   (layer: mean pairwise token cosine at the last step; 0 = input)")
    rate = f"{s['steps_per_sec']:.1f} steps/s, " if s.get("steps_per_sec") else ""
    d = s["devices"]
    lines.append(
        f"  time             {s['wall_time_s']:.1f} s ({rate}{d['count']} {d['platform']} device(s), "
        f"{d['processes']} process(es))"
    )
    lines.append(f"  files            {wd / 'summary.json'}\n                   {wd / 'metrics.jsonl'}")
    lines.append(f"                   {wd / 'curves.png'}\n                   {wd / 'checkpoints'}/")
    print("\n".join(lines), flush=True)


def sample_main(argv: list[str]) -> int:
    """`jaxsmooth sample --workdir DIR --prompt TEXT`: text from a trained character LM, through the KV cache
    (`CausalLM.generate`, one compiled program)."""
    import argparse

    p = argparse.ArgumentParser(prog="jaxsmooth sample", description=sample_main.__doc__)
    p.add_argument("--workdir", required=True, help="a run directory of a text config (shakespeare_char)")
    p.add_argument("--prompt", default="\n", help="the text to continue (default: a newline)")
    p.add_argument("--max_new_tokens", type=int, default=200, help="characters to generate (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default 0.8)")
    p.add_argument("--top_k", type=int, default=None, help="sample among the k likeliest (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the newest)")
    args = p.parse_args(argv)
    import jax
    import jax.numpy as jnp

    from jaxsmooth import train
    from jaxsmooth.train import checkpoint

    try:
        run = train.load_run(args.workdir, args.step)
    except (FileNotFoundError, ValueError, checkpoint.CheckpointError) as e:
        print(f"jaxsmooth sample: error: {e}", file=sys.stderr)
        return 2
    if run.dataset.kind != "text":
        msg = f"{args.workdir} is an image model ({run.config.data.name}); sample needs a character LM run"
        print(f"jaxsmooth sample: error: {msg} (e.g. --config shakespeare_char)", file=sys.stderr)
        return 2
    try:
        ids = run.dataset.encode(args.prompt)
    except ValueError as e:
        print(f"jaxsmooth sample: error: {e}", file=sys.stderr)
        return 2
    ids = ids[-(run.model.max_len - 1) :] if len(ids) >= run.model.max_len else ids
    n = min(args.max_new_tokens, run.model.max_len - len(ids))
    if n < 1:
        print("jaxsmooth sample: error: the prompt fills the model's context; shorten it", file=sys.stderr)
        return 2
    out = run.model.generate(jnp.asarray(ids)[None, :], n, temperature=args.temperature, top_k=args.top_k,
                             rng=jax.random.key(args.seed))  # fmt: skip
    print(run.dataset.decode(out[0]), flush=True)
    if n < args.max_new_tokens:
        print(f"(stopped after {n} characters: the model's context is {run.model.max_len})", file=sys.stderr)
    return 0


def usage() -> str:
    verbs = "\n".join(f"  {v:8s} {h}" for v, h in VERBS.items())
    return f"usage: jaxsmooth <command> [args]\n\ncommands:\n{verbs}\n\n'jaxsmooth train --help' for details."


def _exit_at_once(signum, frame) -> None:
    """SIGINT/SIGTERM outside the training loop (imports, data loading, compilation, the final evaluation):
    nothing is being saved, so exit now. os._exit, not an exception: unwinding while XLA compiles on other
    threads crashed the interpreter at exit (a segfault in 3 of 4 tries). The training loop installs its
    own handler, which saves a checkpoint first."""
    from jaxsmooth.train import workdir as wd  # no JAX: cheap even during start-up

    wd.release_all()
    name = signal.Signals(signum).name
    print(f"\njaxsmooth train: stopped by {name} outside the training loop (nothing to save); rerun the same "
          "command to resume.", file=sys.stderr, flush=True)  # fmt: skip
    sys.stdout.flush()
    os._exit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    """Run a verb. From the command line (argv None), `train` first re-executes itself under a caching
    memory allocator when one is installed (`jaxsmooth.train.runtime`), and Ctrl-C / SIGTERM outside the
    training loop exit at once (rc 130 / 143); a call with an explicit argv does neither."""
    from_command_line = argv is None
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0 if argv else 2
    verb, rest = argv[0], argv[1:]
    if verb == "train":
        if from_command_line:
            for s in (signal.SIGINT, signal.SIGTERM):
                signal.signal(s, _exit_at_once)
        if from_command_line and not ({"-h", "--help"} & set(rest)):
            from jaxsmooth.train import runtime

            # Blocked signals stay blocked, and pending, across exec: a Ctrl-C while the new interpreter
            # starts is delivered once its main() has installed the handler again (then unblocks them).
            sigs = {signal.SIGINT, signal.SIGTERM}
            signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
            try:
                runtime.reexec_with_caching_allocator(argv)  # returns only if it does not re-execute
            except ValueError as e:
                print(f"jaxsmooth: {e}", file=sys.stderr)
                return 2
            finally:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, sigs)
        try:
            return train_main(rest)
        except KeyboardInterrupt:  # a second Ctrl-C inside the loop (the first one saves and stops)
            if not from_command_line:
                raise
            from jaxsmooth.train import workdir as wd

            wd.release_all()
            print(
                "\njaxsmooth train: interrupted; rerun the same command to resume.",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            os._exit(130)
    if verb == "configs":
        return configs_main(rest)
    if verb == "audit":
        from jaxsmooth.tools import audit  # lazily: written separately, imports its own dependencies

        return int(audit.main(rest) or 0)
    if verb == "study":
        from jaxsmooth.tools import study

        return study.main(rest)
    if verb == "sample":
        return sample_main(rest)
    if verb == "convert":
        from jaxsmooth.tools import convert

        return int(convert.main(rest) or 0)
    print(f"jaxsmooth: unknown command {verb!r}\n\n{usage()}", file=sys.stderr)
    return 2
