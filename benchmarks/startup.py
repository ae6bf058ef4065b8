"""A training run's start-up: its first log window against its steady windows (a program).

    python benchmarks/startup.py                      # the demo, both compiler settings
    python benchmarks/startup.py --rounds=2 --out=startup.json
    python benchmarks/startup.py --flagfile=experiments/flags/cpu_2h.flags --steps=1000

Runs `python -m experiments.omniglot --flagfile=<flagfile> --steps=<steps>` in fresh
processes, each with a fresh workdir and a fresh, empty JAX compilation cache (the data
cache is shared, unless `--fresh_data`: then each run prepares the data afresh, as `make
demo` on a new machine, and the step's programs compile meanwhile), and reads the `episodes_per_s`
of each `--log_every` window from the run's `metrics.jsonl`. The first window holds the
compilation the loop waits for (the training step of every `--train_ways`, compiled ahead of
time, `metanet_jax.runtime.steps`); the steady time is the median of the later windows.
Validation runs only at the last step, so no window holds an evaluation.

Settings, alternated round by round so that a noisy machine weighs on both alike:
  programs  the programs' own compiler flags (`experiments.common.CPU_COMPILE_FLAGS`)
  mlir      XLA's default CPU fusion emitters (`--xla_cpu_use_fusion_emitters=true`),
            what the programs compiled with before
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SETTINGS = {
    "programs": "",
    "mlir": "--xla_cpu_use_fusion_emitters=true",
}


def run_once(flagfile: str, steps: int, xla_flags: str, fresh_data: bool = False) -> dict:
    """One fresh training process; its windows' seconds and the first / steady ratio."""
    with tempfile.TemporaryDirectory(prefix="metanet_startup_") as tmp:
        env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=f"{tmp}/jax_cache")
        if fresh_data:
            env["METANET_DATA_DIR"] = f"{tmp}/data"
        env["XLA_FLAGS"] = " ".join(f for f in (env.get("XLA_FLAGS", ""), xla_flags) if f)
        log_every = 250
        cmd = [
            sys.executable, "-m", "experiments.omniglot", f"--flagfile={flagfile}",
            f"--workdir={tmp}/run", f"--steps={steps}", f"--eval_every={steps}",
            f"--checkpoint_every={steps}", f"--log_every={log_every}",
            "--eval_episodes=100", "--test_episodes=100", "--mnist_test_episodes=0",
        ]  # fmt: skip
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
            raise SystemExit(f"the run failed (exit {proc.returncode}): {' '.join(cmd)}")
        records = [json.loads(line) for line in Path(f"{tmp}/run/metrics.jsonl").open()]
    windows = [r["window_steps"] / r["episodes_per_s"] for r in records if "episodes_per_s" in r]
    if len(windows) < 3:
        raise SystemExit(f"--steps={steps} gives {len(windows)} log windows; at least 3 needed")
    steady = statistics.median(windows[1:])
    return {
        "first_window_s": round(windows[0], 2),
        "steady_window_s": round(steady, 2),
        "ratio": round(windows[0] / steady, 2),
        "windows_s": [round(w, 2) for w in windows],
        "process_wall_s": round(wall, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--flagfile", default="experiments/flags/demo.flags")
    parser.add_argument("--steps", type=int, default=1000, help="a multiple of 250, >= 750")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--only", default=",".join(SETTINGS), help="settings, comma-separated")
    parser.add_argument("--fresh_data", action="store_true", help="prepare the data afresh")
    parser.add_argument("--out", help="write the measurements as JSON here")
    args = parser.parse_args()
    names = args.only.split(",")
    unknown = sorted(set(names) - set(SETTINGS))
    if unknown:
        parser.error(f"unknown settings {unknown}; known: {sorted(SETTINGS)}")
    if args.steps < 750 or args.steps % 250:
        parser.error("--steps must be a multiple of 250, at least 750")
    if "XLA_FLAGS" in os.environ and "fusion_emitters" in os.environ["XLA_FLAGS"]:
        parser.error("XLA_FLAGS names the fusion emitters already: unset it to compare")
    runs = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names:
            result = run_once(args.flagfile, args.steps, SETTINGS[name], args.fresh_data)
            runs[name].append(result)
            print(f"round {r + 1} {name:9s} first window {result['first_window_s']:6.2f} s, "
                  f"steady {result['steady_window_s']:6.2f} s, ratio {result['ratio']:.2f}, "
                  f"windows {result['windows_s']}", flush=True)  # fmt: skip
    print("\n| setting | first window s | steady window s | first / steady |\n|---|---|---|---|")
    for name, results in runs.items():
        best = min(results, key=lambda x: x["ratio"])
        print(f"| {name} | {best['first_window_s']:.2f} | {best['steady_window_s']:.2f} | "
              f"{best['ratio']:.2f} |")  # fmt: skip
    if args.out:
        info = {"flagfile": args.flagfile, "steps": args.steps, "fresh_data": args.fresh_data,
                "runs": runs}  # fmt: skip
        Path(args.out).write_text(json.dumps(info, indent=1) + "\n")


if __name__ == "__main__":
    main()
