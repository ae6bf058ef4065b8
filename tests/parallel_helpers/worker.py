"""Subprocess side of tests/test_parallel.py (the device count is fixed when a backend starts).

python tests/parallel_helpers/worker.py devices OUT.json
    (run with XLA_FLAGS=--xla_force_host_platform_device_count=4): one sharded train step
    on 4 devices; loss, params and shardings (tests/test_parallel.py compares them with the
    plain train step on one device).
python tests/parallel_helpers/worker.py process OUT_DIR COORDINATOR NUM_PROCESSES PID
    one of several processes: `STEPS` sharded train steps, each process gathering the
    episodes of its own tasks (`parallel.sample_process_episodes`, the training program's
    stream), then an orbax save and restore of the state; process 0 writes OUT_DIR/params.npz.
"""

from __future__ import annotations

import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

import metanet_jax as mn
from metanet_jax import parallel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from tests.conftest import TINY  # noqa: E402  (the suite's one tiny configuration)

META_BATCH = 4
STEPS = 3
SEED = 7


def class_images() -> np.ndarray:
    """The episodes' class array `[classes, examples, H, W, 1]` (uint8, the same in every
    process)."""
    return np.random.default_rng(SEED).integers(0, 256, (8, 4, 6, 6, 1), dtype=np.uint8)


def data_key(step: int):
    """The key of step `step`'s episodes (`data.sample_episodes(data_key(t), ...)`)."""
    return jax.random.fold_in(jax.random.key(SEED), step)


def config() -> mn.MetaNetConfig:
    return mn.MetaNetConfig(**{**TINY, "num_conv_layers": 1, "task_batching": "vmap"})


def optimizer(cfg):
    """Clipping then plain SGD: Adam's first steps (~lr * sign(g)) would turn float32
    differences in near-zero gradient coordinates into lr-sized parameter differences; with
    SGD a parameter difference is the learning rate times the gradient difference."""
    return optax.chain(optax.clip_by_global_norm(cfg.clip_norm), optax.sgd(0.5))


def initial_state(cfg, optimizer):
    params = mn.init(jax.random.key(0), cfg)
    return mn.init_train_state(params, optimizer, jax.random.key(1))


def flat_params(params) -> dict[str, np.ndarray]:
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


def run_steps(mesh, steps: int = STEPS, meta_batch: int = META_BATCH):
    """`steps` sharded train steps, each process gathering only its own tasks' episodes."""
    cfg = config()
    opt = optimizer(cfg)
    step = parallel.make_sharded_train_step(cfg, opt, mesh)
    state = parallel.replicate(initial_state(cfg, opt), mesh)
    rows = parallel.process_task_indices(meta_batch, mesh)
    images = class_images()
    losses = []
    for t in range(steps):
        support, query = parallel.sample_process_episodes(
            data_key(t), images, cfg.ways, cfg.shots, cfg.queries_per_class, meta_batch, mesh
        )
        state, metrics = step(state, support, query)
        losses.append(float(metrics["loss"]))
    return state, losses, rows


def devices_main(out: str) -> None:
    cfg = config()
    opt = optimizer(cfg)
    assert jax.device_count() == 4, jax.devices()
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(3), cfg, META_BATCH)
    result = {}
    for name, devices in (("mesh4", jax.devices()),):
        mesh = parallel.make_mesh(devices)
        step = parallel.make_sharded_train_step(cfg, opt, mesh)
        state = parallel.replicate(initial_state(cfg, opt), mesh)
        s, q = parallel.shard_episodes((support, query), mesh)
        new_state, metrics = step(state, s, q)
        leaf = new_state.params["base"]["out"]["kernel"]
        result[name] = {
            "loss": float(metrics["loss"]),
            "params": {k: v.tolist() for k, v in flat_params(new_state.params).items()},
            "summary": parallel.device_summary(mesh, META_BATCH),
            "input_spec": str(s.x.sharding.spec),
            "input_shards": sorted(
                [int(sh.data.shape[0]), sh.device.id] for sh in s.x.addressable_shards
            ),
            "param_replicated": bool(leaf.sharding.is_fully_replicated),
            "param_devices": len(leaf.sharding.device_set),
            "grad_norm": float(metrics["grad_norm"]),
            "metric_replicated": bool(metrics["loss"].sharding.is_fully_replicated),
            "step_replicated": bool(new_state.step.sharding.is_fully_replicated),
            "key_replicated": bool(new_state.key.sharding.is_fully_replicated),
            "state_donated": bool(state.params["base"]["out"]["kernel"].is_deleted()),
        }
    try:
        parallel.check_meta_batch(6, parallel.make_mesh())
        result["error"] = None
    except ValueError as e:
        result["error"] = str(e)
    with open(out, "w") as f:
        json.dump(result, f)


def process_main(out_dir: str, coordinator: str, num_processes: int, process_id: int) -> None:
    # Before the backend starts: gloo collectives for CPU arrays shared between processes.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    called = parallel.initialize_distributed(coordinator, num_processes, process_id)
    assert called and jax.process_count() == num_processes, jax.process_count()
    mesh = parallel.make_mesh()
    summary = parallel.device_summary(mesh, META_BATCH)
    state, losses, rows = run_steps(mesh)
    # orbax multi-process save and restore through the project's Checkpointer.
    from metanet_jax import checkpointing

    ckpt = checkpointing.Checkpointer(os.path.join(out_dir, "ckpt"), keep=2)
    ckpt.save(state, {"note": "multi-process test"})
    cfg = config()
    like = initial_state(cfg, optimizer(cfg))
    restored, meta = ckpt.restore(STEPS, like)
    ckpt.close()
    restored = parallel.replicate(restored, mesh)
    same = all(
        np.array_equal(np.asarray(a), np.asarray(b))
        for a, b in zip(
            jax.tree.leaves(restored.params), jax.tree.leaves(state.params), strict=True
        )
    )
    info = {
        "process": jax.process_index(),
        "rows": rows.tolist(),
        "losses": losses,
        "summary": summary,
        "restored_equal": same,
        "restored_step": int(restored.step),
    }
    with open(os.path.join(out_dir, f"process{process_id}.json"), "w") as f:
        json.dump(info, f)
    if parallel.is_primary():
        np.savez(os.path.join(out_dir, "params.npz"), **flat_params(state.params))
    jax.distributed.shutdown()


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "devices":
        devices_main(sys.argv[2])
    elif mode == "process":
        process_main(sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5]))
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    jnp.zeros(()).block_until_ready()
