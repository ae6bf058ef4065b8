"""Fused (C++ FFI) against XLA fast-weight generators, side by side in one process.

    python benchmarks/generator_kernels.py                  # the real sizes, below
    python benchmarks/generator_kernels.py --reps=15 --only=m
    python benchmarks/generator_kernels.py --train_steps=mlp,conv64,cpu_2h --reps=9

For m (the MLP, example level) and d (the LSTM, task level) at the sizes of the MLP MetaNet
(10-way 1-shot, 64 hidden: m on ~555k coordinates, d on ~55k coordinates x T=5) and of the
paper's 64-channel network (5-way 1-shot: m on ~760k, d on ~152k x 5), prints the median time
of the forward pass and of forward + backward (the gradients of the generator's weights, as in
training) for `generator_kernel="xla"` and `"fused"`, alternating the two within each
repetition, and the fused path's GFLOP/s (FLOPs counted on the XLA lowering by XLA's cost
analysis). Needs the kernels built (`make kernels`).

`--train_steps` times whole train steps instead (`mn.make_train_step`, meta-batch 1, synthetic
episodes), the two kernels' steps alternating in one process: the MLP MetaNet (10-way 1-shot,
64 hidden units, 20 output units, T=5), the paper's 64-channel network (5-way 1-shot, 10 queries
per class, T=5) and the 32-channel `cpu_2h.flags` network (5-way, 20 output units, 5 queries
per class, T=1, attention scale 10).
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import jax
import jax.numpy as jnp

import metanet_jax as mn
from metanet_jax import kernels
from metanet_jax.model import generators as gen

# name -> (generator, coordinates, T)
SIZES = {
    "m_mlp_metanet": ("m", 555_000, None),
    "d_mlp_metanet": ("d", 55_500, 5),
    "m_conv64": ("m", 760_000, None),
    "d_conv64": ("d", 152_000, 5),
}


def _inputs(kind: str, coords: int, steps: int | None, hidden: int):
    key = jax.random.key(0)
    if kind == "m":
        params = gen.init_mlp_generator(key, hidden, "authors")
        grads = jax.random.normal(jax.random.key(1), (coords,)) * 1e-3
        feats = gen.preprocess_gradients(grads)  # [2, M]
    else:
        params = gen.init_lstm_generator(key, hidden, "authors")
        grads = jax.random.normal(jax.random.key(1), (steps, coords)) * 1e-3
        feats = jnp.moveaxis(gen.preprocess_gradients(grads), 0, 1)  # [T, 2, P]
    dy = jax.random.normal(jax.random.key(2), feats.shape[-1:])
    return params, feats, dy


def _functions(kind: str, kernel: str):
    generate = gen.mlp_generator if kind == "m" else gen.lstm_generator

    def forward(params, feats):
        return generate(params, feats, kernel=kernel)

    def train(params, feats, dy):  # the generator's weight gradients, as in training
        return jax.grad(lambda p: jnp.vdot(generate(p, feats, kernel=kernel), dy))(params)

    return jax.jit(forward), jax.jit(train)


TRAIN_STEPS = {
    "mlp": dict(ways=10, shots=1, queries_per_class=10, image_shape=(28, 28, 1),
                architecture="mlp", hidden_units=64, max_ways=20),
    "conv64": dict(ways=5, shots=1, queries_per_class=10, image_shape=(28, 28, 1)),
    "cpu_2h": dict(ways=5, shots=1, queries_per_class=5, image_shape=(28, 28, 1),
                   conv_channels=32, max_ways=20, rep_chunks=1, attention_scale=10.0),
}  # fmt: skip


def train_steps(names: list[str], reps: int) -> None:
    """Whole train steps, generator_kernel "xla" and "fused" alternating, medians."""
    print(f"{'network':>8} {'xla ms':>8} {'fused ms':>8} {'speed-up':>8} {'xla cpu ms':>10} "
          f"{'fused cpu ms':>12} {'cpu speed-up':>12}")  # fmt: skip
    for name in names:
        steps, states = {}, {}
        for kernel in ("xla", "fused"):
            config = mn.MetaNetConfig(**TRAIN_STEPS[name], generator_kernel=kernel)
            optimizer = mn.make_optimizer(config)
            params = mn.init(jax.random.key(0), config)
            states[kernel] = mn.init_train_state(params, optimizer, jax.random.key(2))
            steps[kernel] = mn.make_train_step(config, optimizer, validate=False)
        support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, 1)
        times = {"xla": [], "fused": []}
        for rep in range(reps + 2):  # two warm-up steps (the first compiles)
            for kernel in ("xla", "fused"):
                start, cpu = time.perf_counter(), _cpu()
                states[kernel], _ = steps[kernel](states[kernel], support, query)
                jax.block_until_ready(states[kernel])
                if rep >= 2:
                    times[kernel].append((time.perf_counter() - start, _cpu() - cpu))
        (wx, cx), (wf, cf) = (
            [statistics.median(t[i] for t in times[k]) for i in (0, 1)] for k in ("xla", "fused")
        )
        print(f"{name:>8} {wx * 1e3:8.1f} {wf * 1e3:8.1f} {wx / wf:7.2f}x {cx * 1e3:10.1f} "
              f"{cf * 1e3:12.1f} {cx / cf:11.2f}x")  # fmt: skip


def _flops(fn, *args) -> float:
    cost = fn.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost.get("flops", 0.0))


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _time(fn, *args) -> tuple[float, float]:
    """(wall, CPU) seconds of one call (CPU: all threads of this process; less sensitive to
    other programs sharing the machine than wall time)."""
    start, cpu = time.perf_counter(), _cpu()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, _cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--hidden", type=int, default=20)
    parser.add_argument("--only", default="", help="comma-separated names or m/d")
    parser.add_argument(
        "--train_steps", default="", help=f"comma-separated networks of {sorted(TRAIN_STEPS)}"
    )
    args = parser.parse_args()
    if not kernels.fused_available():
        raise SystemExit(f"generator_kernels.py: {kernels.unavailable_reason()}")
    if args.train_steps:
        names = args.train_steps.split(",")
        if not set(names) <= set(TRAIN_STEPS):
            parser.error(f"--train_steps: choose among {sorted(TRAIN_STEPS)}")
        train_steps(names, args.reps)
        return
    print(f"{jax.devices()[0].device_kind}, {args.reps} repetitions, medians, hidden {args.hidden}")
    print(
        f"{'size':>14} {'pass':>8} {'xla ms':>8} {'fused ms':>8} {'speed-up':>8} "
        f"{'xla cpu ms':>10} {'fused cpu ms':>12} {'fused GFLOP/cpu-s':>17}"
    )
    only = {s for s in args.only.split(",") if s}
    for name, (kind, coords, steps) in SIZES.items():
        if only and name not in only and kind not in only:
            continue
        params, feats, dy = _inputs(kind, coords, steps, args.hidden)
        fx, tx = _functions(kind, "xla")
        ff, tf = _functions(kind, "fused")
        for label, (x, f), call in (
            ("forward", (fx, ff), (params, feats)),
            ("fwd+bwd", (tx, tf), (params, feats, dy)),
        ):
            flops = _flops(x, *call)
            jax.block_until_ready((x(*call), f(*call)))
            tx_, tf_ = [], []
            for _ in range(args.reps):
                tx_.append(_time(x, *call))
                tf_.append(_time(f, *call))
            mx, mf = (statistics.median(t[0] for t in ts) for ts in (tx_, tf_))
            cx, cf = (statistics.median(t[1] for t in ts) for ts in (tx_, tf_))
            print(
                f"{name:>14} {label:>8} {mx * 1e3:8.2f} {mf * 1e3:8.2f} {mx / mf:7.1f}x "
                f"{cx * 1e3:10.1f} {cf * 1e3:12.1f} {flops / cf / 1e9:17.1f}"
            )


if __name__ == "__main__":
    main()
