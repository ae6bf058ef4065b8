"""FLOPs of the MetaNet train step from XLA's cost analysis (the one counter of the benchmarks).

Imported by the benchmark scripts as `import flop_count` (a script's own folder is first on
`sys.path`).
"""

from __future__ import annotations

import functools


def flops(lowered_or_compiled) -> float | None:
    """FLOPs XLA's cost analysis counts in a lowered or compiled program (None if it gives none).

    The lowered (not yet optimised) program gives the same count on every backend; a compiled
    GPU executable's count leaves out the work handed to library calls (cuDNN convolutions).
    """
    try:
        cost = lowered_or_compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - best effort on some backends
        return None
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    return float(cost["flops"]) if cost and cost.get("flops") else None


@functools.cache
def train_gflop_per_episode(config, batch: int = 1) -> float | None:
    """GFLOPs per episode of the pure (vmapped) train step at meta-batch `batch`, lowered for
    the host CPU from shapes only (nothing runs), so the count is the same whatever the
    backend and whatever `config.task_batching` runs (a host loop's per-task program alone
    would leave out the update). Counted on the XLA generators (`generator_kernel="xla"`):
    XLA counts no FLOPs in the fused kernels' custom calls."""
    import jax

    import metanet_jax as mn

    config = config.replace(generator_kernel="xla")

    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    optimizer = mn.make_optimizer(config)
    state = jax.eval_shape(
        lambda: mn.init_train_state(
            mn.init(jax.random.key(0), config), optimizer, jax.random.key(1)
        )
    )
    support, query = jax.eval_shape(
        lambda: mn.synthetic.synthetic_episodes(jax.random.key(2), config, batch)
    )
    shapes = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), (state, support, query)
    )
    fn = jax.jit(functools.partial(mn.train_step, config=config, optimizer=optimizer))
    lowered = fn.lower(*shapes)
    total = flops(lowered) or flops(lowered.compile())
    return total / batch / 1e9 if total else None
