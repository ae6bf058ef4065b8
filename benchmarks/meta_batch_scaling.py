"""Per-episode train time at meta-batch 16 against 16 steps at meta-batch 1, alternating.

    python benchmarks/meta_batch_scaling.py            # 3 rounds, default configuration
    python benchmarks/meta_batch_scaling.py --rounds=5 --task_batching=vmap

The issue's criterion "meta-batch 16 no slower per episode than meta-batch 1" compared in one
process, round by round, so that the machine's drift between separate runs (10-20% here)
does not decide it: each round times one B = 16 step and then 16 B = 1 steps on the same 16
synthetic 5-way 1-shot episodes (L = 50), Omniglot CNN, default configuration.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--task_batching", default="auto", choices=["auto", "loop", "vmap"])
    args = parser.parse_args(argv)

    import jax

    import metanet_jax as mn

    config = mn.MetaNetConfig(
        ways=5, shots=1, queries_per_class=10, image_shape=(28, 28, 1),
        task_batching=args.task_batching,
    )  # fmt: skip
    optimizer = mn.make_optimizer(config)
    step = mn.make_train_step(config, optimizer, validate=False)
    state = mn.init_train_state(mn.init(jax.random.key(0), config), optimizer, jax.random.key(2))
    b = args.batch
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, b)
    singles = [
        (jax.tree.map(lambda a, i=i: a[i : i + 1], support),
         jax.tree.map(lambda a, i=i: a[i : i + 1], query))
        for i in range(b)
    ]  # fmt: skip
    print(f"task_batching={config.resolved_task_batching()}, "
          f"query_path={config.resolved_query_path()}; compiling ...", flush=True)  # fmt: skip
    state, _ = step(state, support, query)
    state, _ = step(state, *singles[0])
    jax.block_until_ready(state)
    batched, single = [], []
    for r in range(args.rounds):
        t0 = time.perf_counter()
        state, _ = step(state, support, query)
        jax.block_until_ready(state)
        batched.append((time.perf_counter() - t0) / b)
        t0 = time.perf_counter()
        for s, q in singles:
            state, _ = step(state, s, q)
        jax.block_until_ready(state)
        single.append((time.perf_counter() - t0) / b)
        print(f"round {r}: B={b} {batched[-1]:.3f} s/episode, {b} x B=1 {single[-1]:.3f} "
              "s/episode", flush=True)  # fmt: skip
    mb, ms = statistics.median(batched), statistics.median(single)
    print(f"median: B={b} {mb:.3f} s/episode ({1 / mb:.2f} ep/s), B=1 {ms:.3f} s/episode "
          f"({1 / ms:.2f} ep/s); B={b} / B=1 time ratio {mb / ms:.3f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
