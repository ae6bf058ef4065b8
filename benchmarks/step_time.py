"""Train-step time of named configurations, two source trees side by side (a program).

    python benchmarks/step_time.py --base=/path/to/old/checkout --rounds=3
    python benchmarks/step_time.py --only=mlp,cpu_2h_5way --rounds=2 --out=step_time.json
    python benchmarks/step_time.py --one=mlp          # one measurement in this process

Each measurement is a fresh process whose working directory is a source tree (this one, and
`--base` when given), so it imports that tree's `metanet_jax`: `mn.make_train_step` at
meta-batch 1 on synthetic episodes, 2 warm-up steps, then the median of `--reps` steps.
Rounds alternate the trees (base, head, base, head, ...) so that a noisy machine weighs on
both alike; the table gives each tree's best median and the speed-up base / head. Only APIs
that existed at 0c3ac5d are used, so any later tree can be compared with it. `--set` passes
extra configuration fields to the head tree only (e.g. `--set=generator_kernel=xla`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
HEAD = os.path.dirname(HERE)
COMMON = dict(shots=1, image_shape=(28, 28, 1), max_ways=20)
CONFIGS = {  # issue 19's table
    "mlp": dict(ways=10, queries_per_class=10, architecture="mlp", hidden_units=64),
    "paper": dict(ways=5, queries_per_class=10, conv_channels=64, rep_chunks=5),
    "cpu_2h_5way": dict(
        ways=5, queries_per_class=5, conv_channels=32, rep_chunks=1, attention_scale=10.0
    ),
    "cpu_2h_20way": dict(
        ways=20, queries_per_class=5, conv_channels=32, rep_chunks=1, attention_scale=10.0
    ),
}


def _parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def measure(name: str, reps: int, extra: dict) -> dict:
    """One configuration's step time in this process (this tree's `metanet_jax`)."""
    import jax
    import timing  # this script's folder (HEAD's), whichever tree is measured

    import metanet_jax as mn

    config = mn.MetaNetConfig(**COMMON, **CONFIGS[name], **extra)
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, 1)
    optimizer = mn.make_optimizer(config)
    state = mn.init_train_state(mn.init(jax.random.key(0), config), optimizer, jax.random.key(2))
    step = mn.make_train_step(config, optimizer, validate=False)
    _, _, first, times = timing.time_steps(step, state, support, query, reps)
    return {"config": name, "median_ms": 1e3 * statistics.median(times), "first_s": first,
            "times_ms": [1e3 * t for t in times]}  # fmt: skip


def _run(tree: str, name: str, reps: int, extra: dict) -> dict:
    args = [sys.executable, os.path.abspath(__file__), f"--one={name}", f"--reps={reps}"]
    args += [f"--set={k}={v}" for k, v in extra.items()]
    env = dict(os.environ, PYTHONPATH=tree, JAX_PLATFORMS="cpu")
    env.pop("JAX_COMPILATION_CACHE_DIR", None)  # each process compiles: nothing shared
    out = subprocess.run(args, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if out.returncode:
        raise SystemExit(f"step_time: {name} in {tree} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", help="an older source tree to compare with (e.g. a worktree)")
    parser.add_argument("--only", default=",".join(CONFIGS), help="configurations, comma list")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--set", action="append", default=[], help="field=value (head only)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", help="write the table as JSON here")
    args = parser.parse_args(argv)
    extra = dict(item.split("=", 1) for item in args.set)
    extra = {k: _parse_value(v) for k, v in extra.items()}
    if args.one:
        print(json.dumps(measure(args.one, args.reps, extra)))
        return
    names = args.only.split(",")
    unknown = sorted(set(names) - set(CONFIGS))
    if unknown:
        parser.error(f"unknown configuration(s) {unknown}; known: {sorted(CONFIGS)}")
    trees = ([("base", os.path.abspath(args.base))] if args.base else []) + [("head", HEAD)]
    rows = []
    for name in names:
        best = {}
        for r in range(args.rounds):
            for label, tree in trees:
                result = _run(tree, name, args.reps, extra if label == "head" else {})
                best[label] = min(best.get(label, float("inf")), result["median_ms"])
                print(f"{name} round {r + 1} {label}: {result['median_ms']:.1f} ms "
                      f"(first step {result['first_s']:.1f} s)", flush=True)  # fmt: skip
        row = {"config": name, **{f"{k}_ms": v for k, v in best.items()}}
        if args.base:
            row["speedup"] = best["base"] / best["head"]
        rows.append(row)
    print("\n| configuration | " + " | ".join(f"{t} ms" for t, _ in trees)
          + (" | speed-up |" if args.base else " |"))  # fmt: skip
    print("|---|" + "---|" * (len(trees) + bool(args.base)))
    for row in rows:
        cells = [f"{row[f'{t}_ms']:.1f}" for t, _ in trees]
        if args.base:
            cells.append(f"{row['speedup']:.2f}x")
        print(f"| {row['config']} | " + " | ".join(cells) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": rows, "extra": extra, "base": args.base}, f, indent=1)


if __name__ == "__main__":
    main()
