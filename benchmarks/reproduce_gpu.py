"""Train the paper's previous-split MetaNet models on one accelerator within a time budget.

    bash benchmarks/reproduce_gpu.sh                 # the GPU machine: models into $OUT
    bash benchmarks/reproduce_gpu.sh --smoke         # seconds, on any CPU (checks the script)
    python benchmarks/reproduce_gpu.py --smoke --synthetic --out=/tmp/o   # no data set needed

1. Checks first that every module it needs imports (JAX, flax, optax, orbax, absl, numpy and
   this source tree; TensorFlow, TFDS, TensorBoard and matplotlib are not needed) and that
   the prepared Omniglot caches are in `$METANET_DATA_DIR/cache` (docs/SCALING.md says how
   to carry them; the shell script defaults to `.cache/data` in the checkout); stops with
   one line per problem otherwise.
2. Trains `experiments/flags/previous_5way_metanet.flags` (the paper's settings: 64
   channels, 10 queries per class, Adam 1e-3, clipping 10, 20 output units; `--meta_batch`
   tasks per update, default 1 as the authors did) for `--episodes_5way` episodes (the
   paper's 40,000) or until its share of the budget is spent, then
   `previous_20way_metanet.flags` with the episodes that fit the rest of the budget. The
   training is `experiments.train.train_and_evaluate` (the program's own loop: validation, best
   checkpoint, final test); a time limit stops it the way SIGTERM does (a checkpoint of the
   step reached), then the best validated checkpoint is tested. `--model_flags` adds program
   flags to both models after their flagfiles, e.g. the levers the CPU configurations use
   (`--model_flags="--train_ways=5,10,15,20 --attention_scale=10 --rep_chunks=1"`); without
   it the models are the paper's.
3. Writes each model to `<out>/<name>/` (`params.npz`, `config.json`, `results.json`: the
   pretrained format, `metanet_jax.pretrained`) as soon as it is trained, so a run cut off
   later still leaves the models before it. Back on the CPU:
   `python -m experiments.export_pretrained --workdir=<out>/<name> --name=<name>` measures
   their test accuracy there and adds them to `pretrained/`.

Everything runs from the source tree (`PYTHONPATH`), nothing is installed or downloaded.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import math
import os
import shlex
import signal
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

REQUIRED = ("numpy", "jax", "flax", "optax", "orbax.checkpoint", "absl")
OPTIONAL = {"tensorboard": "TensorBoard event files", "matplotlib": "plots"}
OURS = ("metanet_jax", "metanet_jax.pretrained", "experiments.train", "experiments.exporting",
        "experiments.omniglot")  # fmt: skip
MODELS = (
    ("previous_5way_metanet", "experiments/flags/previous_5way_metanet.flags"),
    ("previous_20way_metanet", "experiments/flags/previous_20way_metanet.flags"),
)
# A network small enough to compile and train in seconds on a CPU (--smoke).
SMOKE_FLAGS = ["--conv_channels=4", "--num_conv_layers=2", "--hidden_units=8",
               "--queries_per_class=2", "--eval_queries_per_class=2", "--rep_chunks=2",
               "--eval_episodes=4", "--test_episodes=4", "--eval_batch=2"]  # fmt: skip
# Program flags this script sets itself, and where a user sets them instead.
DRIVER_FLAGS = {"meta_batch": "--meta_batch", "steps": "--episodes_5way/--episodes_20way",
                "eval_every": "--eval_every", "checkpoint_every": "--eval_every",
                "log_every": "--log_every", "workdir": "--work", "flagfile": "MODELS",
                "mnist_test_episodes": "evaluate on the CPU afterwards"}  # fmt: skip
SYNTHETIC_FLAGS = ["--dataset=synthetic", "--synthetic_size=8"]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "/tmp/metanet_reproduce_gpu/out",
                   help="where the models go (default: $OUT)")  # fmt: skip
    p.add_argument("--work", default="/tmp/metanet_reproduce_gpu/work",
                   help="run folders (checkpoints, metrics); a rerun resumes them")  # fmt: skip
    p.add_argument("--budget_s", type=float, default=540.0,
                   help="wall-clock budget of the whole script, compiles included")  # fmt: skip
    p.add_argument("--share_5way", type=float, default=0.6,
                   help="at most this fraction of the budget for the 5-way model")  # fmt: skip
    p.add_argument("--reserve_s", type=float, default=30.0,
                   help="kept per model for its final test and export")  # fmt: skip
    p.add_argument("--episodes_5way", type=int, default=40_000)
    p.add_argument("--episodes_20way", type=int, default=40_000,
                   help="most 20-way episodes (the budget usually stops it first)")  # fmt: skip
    p.add_argument("--meta_batch", type=int, default=1, help="tasks per update")
    p.add_argument("--eval_every", type=int, default=2500,
                   help="validate (and checkpoint) every this many steps")  # fmt: skip
    p.add_argument("--log_every", type=int, default=500)
    p.add_argument("--model_flags", default="",
                   help="program flags for both models, after their flagfiles (quoted, "
                        "space-separated); the default trains the paper's settings")  # fmt: skip
    p.add_argument("--only", choices=[name for name, _ in MODELS], default=None)
    p.add_argument("--smoke", action="store_true",
                   help="a tiny network and a few steps (seconds, any CPU)")  # fmt: skip
    p.add_argument("--synthetic", action="store_true",
                   help="synthetic episodes, not the Omniglot caches (--smoke)")  # fmt: skip
    p.add_argument("--allow_cpu", action="store_true", help="run without an accelerator")
    p.add_argument("--block_imports", default="",
                   help="comma-separated modules made unimportable first (to prove a smoke run "
                        "needs none of them, e.g. tensorflow,tensorboard,matplotlib)")  # fmt: skip
    args = p.parse_args(argv)
    if args.synthetic and not args.smoke:
        p.error("--synthetic is for --smoke runs")
    args.model_flags = shlex.split(args.model_flags)
    for flag in args.model_flags:
        name = flag.lstrip("-").split("=")[0]
        if not flag.startswith("--"):
            p.error(f"--model_flags takes --name=value flags, not {flag!r}")
        if name in DRIVER_FLAGS:
            p.error(f"--model_flags: --{name} is set by this script ({DRIVER_FLAGS[name]})")
    if args.smoke:  # seconds: a few steps of 5-way, 20-way until the (small) budget stops it
        given = {a.split("=")[0] for a in (argv if argv is not None else sys.argv[1:])}
        for flag, value in (("--budget_s", 40.0), ("--reserve_s", 6.0), ("--episodes_5way", 4),
                            ("--episodes_20way", 10**6), ("--eval_every", 2),
                            ("--log_every", 2)):  # fmt: skip
            if flag not in given:
                setattr(args, flag[2:], value)
    return args


class _Blocker:
    """A meta path finder whose modules fail to import, as if not installed
    (`importlib.util.find_spec` still names them, so etils' "is TensorFlow installed" probe
    says yes; it then only uses TensorFlow for gs:// paths)."""

    def __init__(self, names):
        self.names = set(names)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] not in self.names:
            return None
        import importlib.machinery

        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r} (--block_imports)")

    def exec_module(self, module):  # pragma: no cover - create_module always raises
        raise ModuleNotFoundError(module.__name__)


def check_imports() -> list[str]:
    """One line per required module that does not import; notices for optional ones."""
    problems = []
    for name in REQUIRED + OURS:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - any failure to import is reported
            hint = "" if name in REQUIRED else " (run from the source tree with PYTHONPATH)"
            problems.append(f"cannot import {name}: {type(e).__name__}: {e}{hint}")
    for name, what in OPTIONAL.items():
        try:
            importlib.import_module(name)
        except ImportError:
            print(f"note: {name} is not installed: no {what} (not needed)", flush=True)
    return problems


def check_data(synthetic: bool) -> list[str]:
    if synthetic:
        return []
    from metanet_jax.data import _common

    cache = _common.data_dir() / "cache"
    names = [f"omniglot_{p}_v{_common.CACHE_VERSION}.npz" for p in ("background", "evaluation")]
    missing = [n for n in names if not (cache / n).is_file()]
    if not missing:
        return []
    return [
        f"missing prepared Omniglot cache(s) {', '.join(missing)} in {cache} (set "
        f"{_common.DATA_DIR_ENV} to a folder whose cache/ holds them; prepare them on a machine "
        "with TensorFlow Datasets and carry them: docs/SCALING.md)"
    ]


class Deadline:
    """Sends this process SIGTERM at a wall-clock time, then again every 2 s until the block
    ends (the training loop saves a checkpoint and stops on the first one it sees; one that
    arrives while the run is still loading data is not lost). `hit` tells a deadline's
    signals from a SIGTERM sent from outside."""

    active: Deadline | None = None

    def __init__(self, at: float):
        self.at = at
        self.hit = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        if self._done.wait(max(self.at - time.time(), 0.0)):
            return
        self.hit.set()
        while not self._done.is_set():
            os.kill(os.getpid(), signal.SIGTERM)
            self._done.wait(2.0)

    def __enter__(self):
        Deadline.active = self
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._done.set()
        self._thread.join()
        Deadline.active = None


_EXTERNAL_STOP = threading.Event()


def _on_sigterm(signum, frame):
    """SIGTERM outside the training loop: one from a `Deadline` is ignored (the loop will
    see the next one, or training is over); one from outside ends the script after the
    current phase."""
    del signum, frame
    if Deadline.active is not None and Deadline.active.hit.is_set():
        return
    _EXTERNAL_STOP.set()


def spec_for(name, flagfile, workdir, overrides):
    """The RunSpec of a flagfile with overrides, parsed and validated by the program's flags."""
    from absl import flags, logging

    from experiments import omniglot

    flags.FLAGS.unparse_flags()
    # From the repository root: flagfiles include their base files by paths from there.
    with contextlib.chdir(ROOT):
        flags.FLAGS(["reproduce_gpu", f"--flagfile={ROOT / flagfile}",
                     f"--workdir={Path(workdir).absolute()}", *overrides])  # fmt: skip
    logging.set_verbosity(logging.INFO)  # parsing resets it to absl's --verbosity
    return omniglot.spec_from_flags()


def train_model(spec, deadline_at: float):
    """Trains `spec` until its steps or `deadline_at`, then tests the best checkpoint.

    Returns:
      `(results, stopped)`: the run's results and "completed", "time budget" or "signal".
    """
    from experiments import train

    with Deadline(deadline_at) as deadline:
        outcome = train.train_and_evaluate(spec)
    if outcome["status"] == "completed":
        return outcome, "completed"
    if outcome["status"] != "interrupted":
        raise RuntimeError(f"training stopped: {outcome}")
    stopped = "time budget" if deadline.hit.is_set() else "signal"
    if outcome.get("phase") == "test":  # training had finished; the final test was stopped
        stopped = "completed"
    if stopped == "signal":
        _EXTERNAL_STOP.set()
    # Evaluate-only: steps = the step reached (a mutable field), so the loop does nothing and
    # the best validated checkpoint is tested and results.json written.
    reached = int(outcome["step"])
    results = train.train_and_evaluate(spec.replace(steps=reached))
    return results, stopped


def export(workdir: Path, dest: Path, info: dict) -> dict:
    from experiments import exporting

    return exporting.export(workdir, dest, evaluate=False, info=info, overwrite=True)


def main(argv=None) -> int:
    args = _args(argv)
    t_start = time.time()
    end = t_start + args.budget_s
    if args.block_imports:
        sys.meta_path.insert(0, _Blocker(n.strip() for n in args.block_imports.split(",")))
    print(f"== reproduce_gpu: budget {args.budget_s:.0f} s, out {args.out}", flush=True)
    problems = check_imports()
    if not problems:
        problems = check_data(args.synthetic)
    if problems:
        for line in problems:
            print(f"error: {line}", file=sys.stderr, flush=True)
        return 2
    import jax
    from absl import logging

    from experiments import common, protocol

    logging.use_absl_handler()
    logging.set_verbosity(logging.INFO)
    common.quiet_libraries()
    backend = jax.default_backend()
    kind = jax.devices()[0].device_kind
    print(f"jax {jax.__version__}, backend {backend}: {jax.device_count()} x {kind}", flush=True)
    if backend == "cpu" and not (args.smoke or args.allow_cpu):
        print("error: no accelerator here (the full models take hours on a CPU); --smoke "
              "checks the script, --allow_cpu runs it anyway", file=sys.stderr)  # fmt: skip
        return 1
    signal.signal(signal.SIGTERM, _on_sigterm)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    models = [m for m in MODELS if args.only in (None, m[0])]
    written = []
    for i, (name, flagfile) in enumerate(models):
        if _EXTERNAL_STOP.is_set():
            print(f"== {name}: skipped (stopped by a signal)", flush=True)
            continue
        five = "5way" in name
        episodes = args.episodes_5way if five else args.episodes_20way
        steps = max(1, math.ceil(episodes / args.meta_batch))
        later = len(models) - i - 1
        if five and later:
            train_end = min(end, t_start + args.share_5way * args.budget_s) - args.reserve_s
        else:
            train_end = end - args.reserve_s
        if train_end - time.time() < (5 if args.smoke else 60):
            print(f"== {name}: skipped ({train_end - time.time():.0f} s left for training)")
            continue
        overrides = [*args.model_flags, f"--meta_batch={args.meta_batch}", f"--steps={steps}",
                     f"--eval_every={args.eval_every}", f"--checkpoint_every={args.eval_every}",
                     f"--log_every={args.log_every}", "--mnist_test_episodes=0"]  # fmt: skip
        if args.smoke:
            overrides += SMOKE_FLAGS + (SYNTHETIC_FLAGS if args.synthetic else [])
        spec = spec_for(name, flagfile, work / name, overrides)
        print(f"== {name}: up to {steps:,} steps x {args.meta_batch} tasks, training until "
              f"{train_end - t_start:.0f} s of the budget ({flagfile})", flush=True)  # fmt: skip
        t0 = time.time()
        results, stopped = train_model(spec, train_end)
        reached = int(results["steps"])
        command = protocol.training_command(
            dict(spec.to_dict(), steps=reached), ROOT / flagfile
        ).replace(f"--flagfile={(ROOT / flagfile).as_posix()}", f"--flagfile={flagfile}")
        info = {
            "hardware": f"{jax.device_count()} x {kind}",
            "flagfile": flagfile,
            "command": command,
            "script": "bash benchmarks/reproduce_gpu.sh",
            "stopped": stopped,
            "planned_steps": steps,
            "driver_wall_time_s": round(time.time() - t0, 1),
        }
        saved = export(work / name, out / name, info)
        written.append(name)
        print(f"== {name}: {stopped} at step {reached:,} ({reached * args.meta_batch:,} "
              f"episodes), test {100 * saved['test_accuracy']:.2f}% +- "
              f"{100 * saved['test_ci95']:.2f} ({saved['test_episodes']} episodes, "
              f"on {backend}), written to {out / name} after {time.time() - t_start:.0f} s",
              flush=True)  # fmt: skip
    summary = {name: json.loads((out / name / "results.json").read_text()) for name in written}
    done = ", ".join(
        f"{n} {100 * r['test_accuracy']:.2f}% ({r['steps']:,} steps)" for n, r in summary.items()
    )
    print(f"== done in {time.time() - t_start:.0f} s: {done or 'no model'}", flush=True)
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
