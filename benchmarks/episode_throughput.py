"""Train/predict throughput of the MetaNet episode on this machine (a program, not a test).

    python benchmarks/episode_throughput.py                 # the table of the README
    python benchmarks/episode_throughput.py --only=5w1s_b1 --reps=5
    python benchmarks/episode_throughput.py --baseline_only  # side by side with the prototype

Each setting runs in a fresh subprocess (so peak RSS is its own): Omniglot CNN, 5-way 1-shot
with L = 50 queries at meta-batch 1 and 16, and 20-way 1-shot with L = 200 at meta-batch 1.
Reported per setting: train episodes/s (median of `--reps` steps after warm-up), compile time,
peak RSS, FLOPs per episode (XLA cost analysis of the vmapped lowering, `flop_count`),
achieved GFLOP/s, the f32 matmul peak measured in the same process, and
predict episodes/s. Then the 5-way 1-shot B=1 train step is timed side by side with the
straightforward baseline (`../shared/baselines/metanet_prototype.py`), alternating steps in
one process, and the speed-up printed.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import time

import flop_count
import numpy as np
import timing

SETTINGS = {
    "5w1s_b1": dict(ways=5, shots=1, queries_per_class=10, batch=1),
    "5w1s_b16": dict(ways=5, shots=1, queries_per_class=10, batch=16),
    "20w1s_b1": dict(ways=20, shots=1, queries_per_class=10, batch=1),
}
DEFAULT_BASELINE = os.path.join(
    os.path.dirname(__file__), "..", "..", "shared", "baselines", "metanet_prototype.py"
)


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _matmul_peak() -> float:
    import jax

    a = jax.random.normal(jax.random.key(0), (2048, 2048))
    mm = jax.jit(lambda x, y: x @ y)
    mm(a, a).block_until_ready()
    best = min(_timed(lambda: mm(a, a).block_until_ready()) for _ in range(5))
    return 2 * 2048**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_setting(name: str, reps: int, overrides: dict) -> dict:
    """Measure one setting in this process."""
    import jax

    import metanet_jax as mn

    s = SETTINGS[name]
    config = mn.MetaNetConfig(
        ways=s["ways"], shots=s["shots"], queries_per_class=s["queries_per_class"], **overrides
    )
    batch = s["batch"]
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, batch)
    params = mn.init(jax.random.key(0), config)
    optimizer = mn.make_optimizer(config)
    out = {"setting": name, "batch": batch, "config": {k: str(v) for k, v in overrides.items()}}
    out["matmul_peak_gflops"] = _matmul_peak()

    step = mn.make_train_step(config, optimizer, validate=False)
    out["task_batching"] = step.task_batching
    out["generator_kernel"] = config.resolved_generator_kernel()
    state = mn.init_train_state(params, optimizer, jax.random.key(2))
    out["train_gflop_per_episode"] = flop_count.train_gflop_per_episode(config, batch) or np.nan

    # The first call compiles every program the step runs, then takes one step.
    state, metrics, out["train_compile_s"], times = timing.time_steps(
        step, state, support, query, reps
    )
    median = float(np.median(times))
    out["train_step_s_median"] = median
    out["train_episodes_per_s"] = batch / median
    out["train_gflops_achieved"] = out["train_gflop_per_episode"] * batch / median
    out["train_fraction_of_peak"] = out["train_gflops_achieved"] / out["matmul_peak_gflops"]
    out["loss"] = float(metrics["loss"])

    predict = mn.make_predict(config, validate=False)
    start = time.perf_counter()
    predict(state.params, support, query.x).block_until_ready()
    out["predict_compile_s"] = time.perf_counter() - start
    ptimes = [
        _timed(lambda: predict(state.params, support, query.x).block_until_ready())
        for _ in range(reps)
    ]
    out["predict_episodes_per_s"] = batch / float(np.median(ptimes))
    out["peak_rss_mb"] = _rss_mb()
    return out


def side_by_side(baseline_path: str, reps: int, overrides: dict) -> dict:
    """Alternate our 5-way 1-shot B=1 train step with the baseline's, in one process."""
    import jax

    import metanet_jax as mn

    spec = importlib.util.spec_from_file_location("metanet_prototype", baseline_path)
    proto = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(proto)
    pcfg = argparse.Namespace(
        path="B", B=1, N=5, L=50, T=5, batch_mode="vmap", meta_mode="vmap", unroll=1
    )
    theta = proto.init_theta(jax.random.PRNGKey(0), 5)
    popt = proto.adam_init(theta)
    tasks = proto.make_tasks(jax.random.PRNGKey(1), 1, 5, 50)
    pstep = jax.jit(proto.make_train_step(pcfg))

    config = mn.MetaNetConfig(ways=5, shots=1, queries_per_class=10, **overrides)
    optimizer = mn.make_optimizer(config)
    state = mn.init_train_state(mn.init(jax.random.key(0), config), optimizer, jax.random.key(2))
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, 1)
    ours = mn.make_train_step(config, optimizer, validate=False)

    jax.block_until_ready(pstep(theta, popt, tasks))
    state, _ = ours(state, support, query)
    jax.block_until_ready(state)
    t_ours, t_base = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        theta, popt, _, _ = pstep(theta, popt, tasks)
        jax.block_until_ready(theta)
        t_base.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        state, _ = ours(state, support, query)
        jax.block_until_ready(state)
        t_ours.append(time.perf_counter() - t0)
    ours_s, base_s = float(np.median(t_ours)), float(np.median(t_base))
    return {
        "ours_episodes_per_s": 1 / ours_s,
        "baseline_episodes_per_s": 1 / base_s,
        "speedup": base_s / ours_s,
        "reps": reps,
    }


def _table(rows) -> str:
    lines = [
        "| setting | batching, generators | train ep/s | first step s | GFLOP/ep | GFLOP/s"
        " | of peak | predict ep/s | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['task_batching']}, {r.get('generator_kernel', 'xla')} | "
            f"{r['train_episodes_per_s']:.2f} | "
            f"{r['train_compile_s']:.1f} | "
            f"{r['train_gflop_per_episode']:.1f} | {r['train_gflops_achieved']:.1f} | "
            f"{100 * r['train_fraction_of_peak']:.1f}% | {r['predict_episodes_per_s']:.2f} | "
            f"{r['peak_rss_mb']:.0f} |"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(SETTINGS), action="append")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--baseline", default=DEFAULT_BASELINE)
    parser.add_argument("--baseline_only", action="store_true")
    parser.add_argument("--skip_baseline", action="store_true")
    parser.add_argument("--task_batching", default=None, choices=["auto", "loop", "vmap"])
    parser.add_argument("--query_path", default=None, choices=["auto", "stacked", "patches"])
    parser.add_argument(
        "--generator_kernel",
        default=None,
        choices=["auto", "xla", "fused"],
        help="code computing m and d (FLOPs are counted on the XLA generators either way)",
    )
    parser.add_argument("--json", default="", help="write all results to this file")
    parser.add_argument("--_child", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.reps < 1:
        parser.error("--reps must be >= 1")
    overrides = {
        k: getattr(args, k)
        for k in ("task_batching", "query_path", "generator_kernel")
        if getattr(args, k)
    }
    if args._child:
        print(json.dumps(run_setting(args._child, args.reps, overrides)))
        return 0
    results = {"settings": [], "python": sys.version.split()[0]}
    if not args.baseline_only:
        for name in args.only or list(SETTINGS):
            cmd = [sys.executable, __file__, f"--_child={name}", f"--reps={args.reps}"]
            cmd += [f"--{k}={v}" for k, v in overrides.items()]
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode != 0:
                print(proc.stderr[-3000:], file=sys.stderr)
                return proc.returncode
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            results["settings"].append(row)
            print(json.dumps(row), flush=True)
        print(_table(results["settings"]))
    if not args.skip_baseline:
        if not os.path.exists(args.baseline):
            print(f"baseline not found at {args.baseline}; pass --baseline", file=sys.stderr)
            return 1
        print("[bench] side by side with the baseline ...", file=sys.stderr, flush=True)
        results["side_by_side"] = side_by_side(args.baseline, max(args.reps, 5), overrides)
        sbs = results["side_by_side"]
        print(
            f"5-way 1-shot L=50 B=1 train step, alternating in one process: "
            f"ours {sbs['ours_episodes_per_s']:.2f} ep/s, baseline "
            f"{sbs['baseline_episodes_per_s']:.2f} ep/s, speed-up {sbs['speedup']:.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
