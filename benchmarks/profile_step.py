"""Where the train step's time goes: XLA's own per-op timings from a JAX profiler trace.

    python benchmarks/profile_step.py                  # 5-way 1-shot, L = 50, B = 1, default config
    python benchmarks/profile_step.py --ways=20 --queries_per_class=10 --top=30

Runs the default train step twice to warm up, traces `--steps` more with
`jax.profiler` (a Perfetto trace, no TensorBoard needed), and prints the time per step of
each kind of XLA op (fusions grouped by name, e.g. `ynn_fusion` = dots and convolutions,
`add_divide_fusion`, `wrapped_tanh`), then the largest single ops with their output shapes
and, for dots and convolutions, the HLO instruction, so each can be traced back to the model.
Times are summed over XLA's threads, so they can exceed the wall time.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

_WRAPPERS = ("ThunkExecutor", "$", "PjitFunction", "CommonPjRt", "PjRt", "SlinkyThreadPool")


def _hlo_index(text: str) -> tuple[dict[str, tuple[str, str]], dict[str, str]]:
    """`{op: (shape, called computation)}` and `{computation: its dot/conv instruction}`."""
    ops, bodies, current = {}, {}, None
    for line in text.splitlines():
        if line and not line.startswith(" ") and line.rstrip().endswith("{"):
            current = line.split()[0].lstrip("%")
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
        if m and m.group(1) not in ops:
            called = re.search(r"calls=%([\w.\-]+)", line)
            ops[m.group(1)] = (m.group(2), called.group(1) if called else "")
        if current and ("convolution(" in line or " dot(" in line) and current not in bodies:
            bodies[current] = re.sub(r",? metadata=.*", "", line.strip())
    return ops, bodies


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--queries_per_class", type=int, default=10)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=20)
    args = p.parse_args(argv)

    import jax

    import metanet_jax as mn

    config = mn.MetaNetConfig(
        ways=args.ways, shots=1, queries_per_class=args.queries_per_class,
        image_shape=(28, 28, 1),
    )  # fmt: skip
    optimizer = mn.make_optimizer(config)
    step = mn.make_train_step(config, optimizer, validate=False)
    state = mn.init_train_state(mn.init(jax.random.key(0), config), optimizer, jax.random.key(2))
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, 1)
    ops, bodies = _hlo_index(step.lower(state, support, query).compile().as_text())
    for _ in range(2):
        state, _ = step(state, support, query)
    jax.block_until_ready(state)
    with tempfile.TemporaryDirectory() as logdir:
        jax.profiler.start_trace(logdir, create_perfetto_trace=True)
        for _ in range(args.steps):
            state, _ = step(state, support, query)
        jax.block_until_ready(state)
        jax.profiler.stop_trace()
        trace = sorted(glob.glob(f"{logdir}/**/*.trace.json.gz", recursive=True))[-1]
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    by_op, by_kind = collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "dur" in e and not e["name"].startswith(_WRAPPERS):
            by_op[e["name"]] += e["dur"] / 1e3 / args.steps
            by_kind[re.sub(r"\.\d+$", "", e["name"])] += e["dur"] / 1e3 / args.steps
    print(f"task_batching={config.resolved_task_batching()}, query_path="
          f"{config.resolved_query_path()}; ms per step, summed over threads: "
          f"{sum(by_kind.values()):.0f}")  # fmt: skip
    print("\nby kind of op:")
    for name, ms in by_kind.most_common(args.top):
        print(f"{ms:9.1f} ms  {name}")
    print("\nlargest ops:")
    for name, ms in by_op.most_common(args.top):
        shape, comp = ops.get(name, ("?", ""))
        print(f"{ms:9.1f} ms  {name:32s} {shape[:44]:44s} {bodies.get(comp, '')[:110]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
