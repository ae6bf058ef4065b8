r"""Run an ablation plan: one training run per lever, each against the same fixed validation
episodes, and write the table that docs/RESULTS.md shows.

  python -m experiments.ablation --plan=experiments/ablations/demo_levers.json

A plan (JSON) names a base flagfile, flags common to every run, and the runs:

  {"name": "demo_levers", "base_flagfile": "experiments/flags/demo.flags",
   "common_flags": ["--validation_alphabets=4", "--eval_episodes=400"],
   "runs": [{"name": "baseline", "description": "...", "flags": []}, ...]}

Each run is `python -m experiments.omniglot --flagfile=<base> <common> <run flags>
--workdir=<workdir_root>/<plan>/<run>` in a subprocess, one after another (the machine's
cores go to one run at a time, so wall times compare). A run whose workdir already holds
`results.json` is not run again, and an interrupted one resumes from its checkpoint (the
program's own resume), so the plan can be restarted after a session ends. A plan's optional
`"eval_ways": [20, ...]` also measures each finished run's best checkpoint on the run's fixed
validation episodes at those ways (`experiments.evaluate --subset=validation`, written to the
workdir as `eval_validation_<K>way.json`), for models meant to be tested on more ways than
they train on. Choosing is done on
validation only: the table records the best and the final validation accuracy (with their 95%
CIs), the steps, the wall time and the episodes/s of every run, and the test accuracy only as
a record. Output: `--out` (default `docs/ablations/<plan>.json`), rewritten after every run.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

from absl import app, flags

from metanet_jax import logging_utils

FLAGS = flags.FLAGS
flags.DEFINE_string("plan", None, "The ablation plan (JSON).", required=True)
flags.DEFINE_string("workdir_root", "workdirs/ablations", "Where the runs' workdirs go.")
flags.DEFINE_string("out", None, "Output JSON (default: docs/ablations/<plan name>.json).")
flags.DEFINE_list("only", [], "Run only these runs of the plan (default: all).")
flags.DEFINE_bool("collect_only", False, "Do not train: only gather finished runs' results.")


def load_plan(path: str | Path) -> dict:
    """The plan at `path`, checked: a name, a base flagfile and uniquely named runs."""
    plan = json.loads(Path(path).read_text())
    for key in ("name", "base_flagfile", "runs"):
        if key not in plan:
            raise ValueError(f"{path}: the plan has no {key!r}")
    ways = plan.get("eval_ways", [])
    if not (isinstance(ways, list) and all(isinstance(w, int) and w >= 2 for w in ways)):
        raise ValueError(f"{path}: 'eval_ways' must be a list of integers >= 2, got {ways!r}")
    names = [r["name"] for r in plan["runs"]]
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: run names repeat: {names}")
    if not Path(plan["base_flagfile"]).is_file():
        raise FileNotFoundError(f"{path}: no flagfile {plan['base_flagfile']}")
    return plan


def run_command(plan: dict, run: dict, workdir: Path) -> list[str]:
    """The program's command line for one run of the plan."""
    return [
        sys.executable, "-m", "experiments.omniglot",
        f"--flagfile={plan['base_flagfile']}",
        *plan.get("common_flags", []),
        *run.get("flags", []),
        f"--workdir={workdir}",
    ]  # fmt: skip


def eval_command(workdir: Path, ways: int) -> list[str]:
    """The command that measures a run on its validation episodes at `ways` ways (it writes
    `eval_validation_<ways>way.json` in the workdir: `eval_path`)."""
    return [
        sys.executable, "-m", "experiments.evaluate", f"--workdir={workdir}",
        "--subset=validation", f"--ways={ways}", f"--name=validation_{ways}way",
    ]  # fmt: skip


def eval_path(workdir: Path, ways: int) -> Path:
    """Where `eval_command(workdir, ways)` writes its result."""
    return workdir / f"eval_validation_{ways}way.json"


def _validation_by_ways(workdir: Path) -> dict[str, dict]:
    out = {}
    for path in workdir.glob(eval_path(Path(), "*").name):
        value = json.loads(path.read_text())
        out[str(value["ways"])] = {k: value[k] for k in ("accuracy", "ci95", "episodes")}
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))


def summarise(workdir: Path) -> dict | None:
    """The table row of a finished run (None while `results.json` is missing)."""
    results_path = workdir / "results.json"
    if not results_path.is_file():
        return None
    results = json.loads(results_path.read_text())
    records = logging_utils.read_metrics(workdir / "metrics.jsonl")
    validations = [r for r in records if "validation_accuracy" in r]
    best = max(validations, key=lambda r: (r["validation_accuracy"], -r["step"]))
    final = max(validations, key=lambda r: r["step"])
    return {
        "steps": results["steps"],
        "wall_time_s": round(results["wall_time_s"], 1),
        "episodes_per_s": round(results["episodes_per_s"], 2),
        "best_validation_accuracy": best["validation_accuracy"],
        "best_validation_ci95": best.get("validation_ci95"),
        "best_validation_step": best["step"],
        "final_validation_accuracy": final["validation_accuracy"],
        "final_validation_ci95": final.get("validation_ci95"),
        "validation_curve": [[r["step"], round(r["validation_accuracy"], 4)] for r in validations],
        "validation_episodes": results["config"]["eval_episodes"],
        "test_accuracy_record_only": results.get("test_accuracy"),
        "test_episodes": results.get("test_episodes"),
        "validation_by_ways": _validation_by_ways(workdir),
    }


def write_table(plan: dict, rows: list[dict], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    table = {
        "name": plan["name"],
        "description": plan.get("description", ""),
        "base_flagfile": plan["base_flagfile"],
        "common_flags": plan.get("common_flags", []),
        "command": f"python -m experiments.ablation --plan={FLAGS.plan}",
        "rows": rows,
    }
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(table, indent=1) + "\n")
    tmp.replace(out)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    try:
        plan = load_plan(FLAGS.plan)
    except (ValueError, FileNotFoundError, json.JSONDecodeError) as e:
        print(f"ablation.py: error: {e}", file=sys.stderr)
        sys.exit(1)
    out = Path(FLAGS.out or f"docs/ablations/{plan['name']}.json")
    root = Path(FLAGS.workdir_root) / plan["name"]
    unknown = set(FLAGS.only) - {r["name"] for r in plan["runs"]}
    if unknown:
        print(f"ablation.py: error: --only names unknown runs {sorted(unknown)}", file=sys.stderr)
        sys.exit(1)
    rows = []
    for run in plan["runs"]:
        workdir = root / run["name"]
        summary = summarise(workdir)
        if (
            summary is None
            and not FLAGS.collect_only
            and (not FLAGS.only or run["name"] in FLAGS.only)
        ):
            print(f"[{time.strftime('%H:%M:%S')}] run {run['name']}: {run.get('flags', [])}",
                  flush=True)  # fmt: skip
            status = subprocess.run(run_command(plan, run, workdir)).returncode
            if status != 0:
                print(f"run {run['name']} exited with status {status}", flush=True)
            summary = summarise(workdir)
        missing = [w for w in plan.get("eval_ways", []) if not eval_path(workdir, w).is_file()]
        if summary is not None and missing and not FLAGS.collect_only:
            for ways in missing:
                status = subprocess.run(eval_command(workdir, ways)).returncode
                if status != 0:
                    print(f"run {run['name']}: the {ways}-way validation exited with status "
                          f"{status}", flush=True)  # fmt: skip
            summary = summarise(workdir)
        if summary is not None:
            rows.append({"name": run["name"], "description": run.get("description", ""),
                         "flags": run.get("flags", []), **summary})  # fmt: skip
            print(f"{run['name']}: best validation {summary['best_validation_accuracy']:.4f} "
                  f"(step {summary['best_validation_step']}), {summary['wall_time_s']:.0f} s",
                  flush=True)  # fmt: skip
        write_table(plan, rows, out)
    print(f"table: {out}")


if __name__ == "__main__":
    app.run(main)
