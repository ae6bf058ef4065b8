"""Train throughput of the sharded MetaNet step on this machine's accelerator (or CPU).

    python benchmarks/accelerator_check.py                    # the table of docs/SCALING.md
    python benchmarks/accelerator_check.py --smoke            # tiny model, seconds, any CPU
    python benchmarks/accelerator_check.py --peak_bf16_tflops=989 --peak_tf32_tflops=494

Settings: Omniglot CNN (28x28x1, 64 channels, 5 conv layers), 1-shot with 10 queries per
class, `task_batching="vmap"`, synthetic episodes (no data set, no network): 5-way at
meta-batch 1, 16, 64 and 20-way at meta-batch 1, 16, each in float32 and bfloat16 compute.

Per setting: compile time, train episodes/s (steps timed for `--seconds` after two warm-up
steps), FLOPs per episode (XLA cost analysis of the lowered, vmapped per-device step),
achieved TFLOP/s and its fraction of the chip's peak for that dtype. Defaults are the H100
SXM dense tensor-core peaks: 989 TFLOP/s bfloat16, 494 TFLOP/s TF32 (XLA runs float32
convolutions and matmuls as TF32 on NVIDIA GPUs at JAX's default precision; the non-tensor
float32 peak is 67). An H200 has the same compute peaks. Settings stop being started once
`--budget_s` seconds have passed (skipped ones are listed), so the script stays bounded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import flop_count  # noqa: E402 - this folder (first on sys.path when run as a script)

SETTINGS = [(5, 1), (5, 16), (5, 64), (20, 1), (20, 16)]  # (ways, meta-batch)
SMOKE_SETTINGS = [(3, 1), (3, 2)]


def _args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny model, 2 settings (CPU check)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--settings", default=None, help="e.g. 5x1,5x16 (ways x meta-batch)")
    p.add_argument("--seconds", type=float, default=3.0, help="timed seconds per setting")
    p.add_argument("--budget_s", type=float, default=330.0, help="no new setting after this")
    p.add_argument("--peak_bf16_tflops", type=float, default=989.0)
    p.add_argument("--peak_tf32_tflops", type=float, default=494.0, help="float32 compute")
    p.add_argument("--devices", type=int, default=1, help="devices in the mesh (per-chip: 1)")
    p.add_argument("--json", default=None, help="also write the rows here")
    return p.parse_args(argv)


def _config(ways: int, dtype: str, smoke: bool):
    import metanet_jax as mn

    if smoke:
        return mn.MetaNetConfig(
            ways=ways,
            shots=1,
            queries_per_class=2,
            image_shape=(6, 6, 1),
            conv_channels=3,
            num_conv_layers=1,
            hidden_units=5,
            rep_chunks=1,
            lstm_hidden=4,
            generator_hidden=4,
            task_batching="vmap",
            compute_dtype=dtype,
        )
    return mn.MetaNetConfig(
        ways=ways,
        shots=1,
        queries_per_class=10,
        image_shape=(28, 28, 1),
        architecture="omniglot_cnn",
        task_batching="vmap",
        compute_dtype=dtype,
    )


def run_setting(ways, batch, dtype, args, mesh):
    import jax

    import metanet_jax as mn
    from metanet_jax import parallel

    config = _config(ways, dtype, args.smoke)
    optimizer = mn.make_optimizer(config)
    step = parallel.make_sharded_train_step(config, optimizer, mesh)
    state = parallel.replicate(
        mn.init_train_state(mn.init(jax.random.key(0), config), optimizer, jax.random.key(1)),
        mesh,
    )
    batches = [
        parallel.shard_episodes(
            mn.synthetic.synthetic_episodes(jax.random.key(10 + i), config, batch), mesh
        )
        for i in range(4)
    ]
    t0 = time.perf_counter()
    lowered = step.lower(state, *batches[0])
    exe = lowered.compile()  # the executable the timed steps run
    compiled = time.perf_counter() - t0
    total = flop_count.flops(lowered)
    flops = total / (batch / mesh.size) if total else None  # per-device program
    if flops is None:  # jax >= 0.11 gives no cost analysis before compiling
        gflop = flop_count.train_gflop_per_episode(config)
        flops = gflop * 1e9 if gflop else None
    t0 = time.perf_counter()
    for i in range(2):
        state, metrics = exe(state, *batches[i % 4])
    jax.block_until_ready(metrics)
    warm = time.perf_counter() - t0
    steps, t0 = 0, time.perf_counter()
    while True:
        state, metrics = exe(state, *batches[steps % 4])
        steps += 1
        if steps >= 3 and steps % 5 == 0:
            jax.block_until_ready(metrics)
            if time.perf_counter() - t0 >= args.seconds:
                break
    jax.block_until_ready(state)
    elapsed = time.perf_counter() - t0
    eps = steps * batch / elapsed
    peak = args.peak_bf16_tflops if dtype == "bfloat16" else args.peak_tf32_tflops
    achieved = flops * eps / 1e12 if flops else None
    return {
        "setting": f"{ways}-way 1-shot",
        "meta_batch": batch,
        "dtype": dtype,
        "episodes_per_s": eps,
        "steps_timed": steps,
        "compile_s": compiled,
        "warmup_s": warm,
        "gflop_per_episode": flops / 1e9 if flops else None,
        "achieved_tflops": achieved,
        "peak_tflops": peak,
        "fraction_of_peak": achieved / peak if achieved else None,
        "loss": float(metrics["loss"]),
    }


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def main(argv=None) -> int:
    args = _args(argv)
    import jax

    from metanet_jax import parallel

    start = time.perf_counter()
    devices = jax.devices()[: args.devices]
    mesh = parallel.make_mesh(devices)
    print(f"jax {jax.__version__}; {parallel.device_summary(mesh, 1 * mesh.size)}")
    print(f"device kind: {devices[0].device_kind}")
    if args.settings:
        settings = [tuple(int(v) for v in s.split("x")) for s in args.settings.split(",")]
    else:
        settings = SMOKE_SETTINGS if args.smoke else SETTINGS
    dtypes = args.dtypes.split(",")
    header = (
        f"{'setting':<16}{'B':>4} {'dtype':<9}{'episodes/s':>11}{'GFLOP/ep':>10}"
        f"{'TFLOP/s':>9}{'of peak':>9}{'compile s':>10}"
    )
    print(header)
    rows, skipped = [], []
    for ways, batch in settings:
        for dtype in dtypes:
            if time.perf_counter() - start > args.budget_s:
                skipped.append(f"{ways}-way B={batch} {dtype}")
                continue
            if batch % mesh.size:
                skipped.append(f"{ways}-way B={batch} {dtype} (not divisible)")
                continue
            try:
                r = run_setting(ways, batch, dtype, args, mesh)
            except Exception as e:  # noqa: BLE001 - report and go on (e.g. out of memory)
                print(f"{ways}-way 1-shot B={batch} {dtype}: FAILED {type(e).__name__}: {e}")
                rows.append({"setting": f"{ways}-way 1-shot", "meta_batch": batch,
                             "dtype": dtype, "error": f"{type(e).__name__}: {e}"})  # fmt: skip
                continue
            rows.append(r)
            frac = r["fraction_of_peak"]
            print(
                f"{r['setting']:<16}{batch:>4} {dtype:<9}{r['episodes_per_s']:>11.1f}"
                f"{_fmt(r['gflop_per_episode'], '.3f'):>10}{_fmt(r['achieved_tflops'], '.2f'):>9}"
                f"{_fmt(None if frac is None else 100 * frac, '.3f') + '%':>9}"
                f"{r['compile_s']:>10.1f}",
                flush=True,
            )
    if skipped:
        print(f"skipped (over --budget_s={args.budget_s:g}): {', '.join(skipped)}")
    print(f"total {time.perf_counter() - start:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"device": devices[0].device_kind, "rows": rows}))
    return 0 if rows and all("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
