"""Data parallelism over the task axis (metanet_jax.parallel): several devices, several
processes, bfloat16 compute.

The device count of a process is fixed when its backend starts, so the 4-device and the
2-process checks run in subprocesses (tests/parallel_helpers/worker.py), started together at
the beginning of this module so that they overlap with the in-process tests; each is bounded
by a timeout and killed when it runs over.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax import parallel
from tests.conftest import tiny_config
from tests.parallel_helpers import worker

WORKER = str(Path(worker.__file__).resolve())
ROOT = str(Path(__file__).resolve().parents[1])
TIMEOUT_S = 240  # per subprocess group; a loaded 2-core machine needs ~60 s


def _env(devices: int) -> dict[str, str]:
    env = dict(os.environ)
    flags = [
        f
        for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
    ]
    if not any(f.startswith("--xla_backend_optimization_level") for f in flags):
        flags.append("--xla_backend_optimization_level=0")
    flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JOBSET_NAME"):
        env.pop(name, None)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Group:
    """Subprocesses started together and waited for together (killed on timeout)."""

    def __init__(self, commands, env, cwd):
        self.start = time.time()
        self.procs = [
            subprocess.Popen(
                cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
            for cmd in commands
        ]
        self.outputs: list[str] | None = None

    def wait(self) -> list[str]:
        if self.outputs is not None:
            return self.outputs
        outputs = []
        try:
            for p in self.procs:
                left = max(1.0, TIMEOUT_S - (time.time() - self.start))
                outputs.append(p.communicate(timeout=left)[0])
        except subprocess.TimeoutExpired:
            for p in self.procs:
                if p.poll() is None:
                    p.kill()
                    p.communicate()
            pytest.fail(f"worker subprocesses ran over {TIMEOUT_S} s and were killed")
        self.outputs = outputs
        for p, out in zip(self.procs, outputs, strict=True):
            assert p.returncode == 0, f"worker {p.args} failed:\n{out[-4000:]}"
        return outputs

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.communicate()


_SUBPROCESS_TESTS = ("test_four_devices_match_one_device", "test_two_processes_match_one_process")
_DEVICE_TESTS = ("test_four_devices_match_one_device",)


@pytest.fixture(scope="module", autouse=True)
def workers(request, tmp_path_factory):
    """Starts the 4-device worker and the two process workers once, concurrently, when
    the tests that read them are selected (so they overlap with the in-process tests)."""
    selected = {item.originalname for item in request.session.items}
    groups = {"devices": None, "processes": None}
    tmp = tmp_path_factory.mktemp("parallel")
    if selected & set(_DEVICE_TESTS):
        out = tmp / "devices.json"
        cmd = [sys.executable, WORKER, "devices", str(out)]
        groups["devices"] = (_Group([cmd], _env(4), ROOT), out)
    if _SUBPROCESS_TESTS[1] in selected:
        address = f"127.0.0.1:{_free_port()}"
        cmds = [
            [sys.executable, WORKER, "process", str(tmp), address, "2", str(i)] for i in range(2)
        ]
        groups["processes"] = (_Group(cmds, _env(1), ROOT), tmp)
    yield groups
    for group in groups.values():
        if group is not None:
            group[0].kill()


# ----------------------------------------------------------------------------- cheap, in-process
@pytest.mark.parametrize("rotations_as_classes", [False, True])
def test_process_episodes_are_the_rows_of_the_batch_sampler(rotations_as_classes):
    """`sample_process_episodes` (the training loop's sampler on several devices or
    processes) gives bitwise the episodes of `data.sample_episodes`: all of them in one
    process, and the rows a process owns (`sample_episodes(..., rows=...)`) in several."""
    from metanet_jax import data

    images = np.random.default_rng(0).integers(0, 256, (7, 5, 6, 6, 1), dtype=np.uint8)
    key = jax.random.fold_in(jax.random.key(3), 11)
    kw = dict(rotate=True, rotations_as_classes=rotations_as_classes)
    batch = 4 * jax.device_count()
    whole = data.sample_episodes(key, images, 3, 1, 2, batch, **kw)
    mesh = parallel.make_mesh()
    sharded = parallel.sample_process_episodes(key, images, 3, 1, 2, batch, mesh, **kw)
    assert sharded[0].x.sharding == parallel.batch_sharding(mesh)
    rows = np.array([1, 3])
    part = data.sample_episodes(key, images, 3, 1, 2, batch, rows=jnp.asarray(rows), **kw)
    for w, s, p in zip(whole, sharded, part, strict=True):
        for name in ("x", "y"):
            np.testing.assert_array_equal(np.asarray(getattr(s, name)), getattr(w, name))
            np.testing.assert_array_equal(np.asarray(getattr(p, name)), getattr(w, name)[rows])
    assert not np.array_equal(np.asarray(whole[0].x[1]), np.asarray(whole[0].x[3]))


def test_single_process_setup_is_a_no_op(monkeypatch):
    for name in ("SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JOBSET_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False
    monkeypatch.setenv("SLURM_STEP_ID", "0")
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "1")
    assert parallel._detected_cluster() is None  # a one-task srun step: single process
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", "2")
    assert parallel._detected_cluster() == "slurm"
    monkeypatch.delenv("SLURM_STEP_ID")
    assert parallel.initialize_distributed(num_processes=1) is False
    with pytest.raises(ValueError, match="process_id"):
        parallel.initialize_distributed(num_processes=2, process_id=2)
    mesh = parallel.make_mesh()
    assert parallel.is_primary()
    n = jax.device_count()
    summary = parallel.device_summary(mesh, 4 * n)
    assert summary.startswith(f"devices: {n} ({jax.devices()[0].platform}")
    assert summary.endswith(f"), processes: 1, mesh: ({n},), per-device meta-batch: 4")
    assert parallel.device_counts(mesh)["processes"] == 1
    with pytest.raises(ValueError, match="positive"):
        parallel.check_meta_batch(0, mesh)
    np.testing.assert_array_equal(
        parallel.process_task_indices(4 * mesh.size, mesh), np.arange(4 * mesh.size)
    )


# ----------------------------------------------------------------------------- bfloat16
# What bfloat16 compute may change, one device, the same params and episodes (4 tasks, the
# tiny network with 1 or 2 conv layers). Measured over 4 seeds x both depths, relative to
# float32: the mean loss by at most 8e-4, a task's loss 1.7e-3, the logits 1.7e-2 (of their
# largest magnitude); the fast weights themselves (norm of the difference over the norm),
# example level M 0.25 and task level Q* 0.27: bfloat16's ~0.4% rounding of a near-zero
# gradient coordinate moves its preprocessed features (log |g| / p, g e^p) a long way.
# Bounds: the measured maxima plus half.
BF16_BOUNDS = {"loss": 1.2e-3, "task_loss": 2.5e-3, "logits": 2.5e-2, "values": 0.4, "q_star": 0.4}


def _fast_weights(params, support, config):
    """Steps 1-4 of `episode.task_forward`, per task: M and Q* (`[B, ...]` leaves)."""
    dtype = jnp.bfloat16 if config.compute_dtype == "bfloat16" else jnp.float32

    def one(x, y):
        task = mn.Episode(x.astype(dtype), y)
        grads_u, _ = mn.representation_meta_info(params["representation"], task, config)
        gen_u, p = params["task_generator"]["representation"], config.grad_p
        grads_b = mn.base_meta_info(params["base"], task.x, task.y, config)
        return {
            "values": mn.example_fast_weights(params["example_generator"], grads_b, p, jnp.float32),
            "q_star": mn.task_fast_weights(gen_u, grads_u, p, jnp.float32),
        }

    return jax.vmap(one)(support.x, support.y)


def _relative(a, b):
    """Norm of `a - b` over the norm of `b` (all leaves) per task, the largest of the tasks."""
    sq = lambda x: jnp.sum(jnp.square(x).reshape(x.shape[0], -1), 1)  # noqa: E731
    diff = sum(sq(x - y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))
    ref = sum(sq(y) for y in jax.tree.leaves(b))
    return float(jnp.max(jnp.sqrt(diff / ref)))


def test_bfloat16_changes_loss_logits_and_fast_weights_within_the_measured_bounds():
    cfg32 = tiny_config(task_batching="vmap", num_conv_layers=1)
    cfg16 = cfg32.replace(compute_dtype="bfloat16")
    params = mn.init(jax.random.key(0), cfg32)
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), cfg32, 4)
    out = {}
    for cfg in (cfg32, cfg16):

        def run(p, s, q, cfg=cfg):
            return mn.episode_loss(p, s, q, cfg), _fast_weights(p, s, cfg)

        out[cfg.compute_dtype] = jax.jit(run)(params, support, query)
    ((loss32, aux32), fast32), ((loss16, aux16), fast16) = out["float32"], out["bfloat16"]
    assert loss16.dtype == jnp.float32 and aux16["logits"].dtype == jnp.float32
    logits16, logits32 = aux16["logits"], aux32["logits"]
    changes = {
        "loss": abs(float(loss16) / float(loss32) - 1),
        "task_loss": float(jnp.max(jnp.abs(aux16["task_loss"] / aux32["task_loss"] - 1))),
        "logits": float(jnp.abs(logits16 - logits32).max() / jnp.abs(logits32).max()),
        "values": _relative(fast16["values"], fast32["values"]),
        "q_star": _relative(fast16["q_star"], fast32["q_star"]),
    }
    print("\nbfloat16 vs float32:", {k: f"{v:.1e}" for k, v in changes.items()})
    for name, bound in BF16_BOUNDS.items():
        assert changes[name] <= bound, (name, changes)
    assert changes["logits"] > 0 and changes["values"] > 0  # bfloat16 did run


def test_bfloat16_training_learns():
    """The sharded step in bfloat16 on the synthetic problem: the loss falls, params stay
    float32."""
    cfg = mn.MetaNetConfig(
        ways=3,
        shots=1,
        queries_per_class=3,
        image_shape=(6, 6, 1),
        conv_channels=4,
        num_conv_layers=1,
        hidden_units=8,
        rep_chunks=1,
        lstm_hidden=4,
        generator_hidden=6,
        task_batching="vmap",
        learning_rate=1e-2,
        compute_dtype="bfloat16",
    )
    optimizer = mn.make_optimizer(cfg)
    mesh = parallel.make_mesh()
    batch = 4 * mesh.size
    step = parallel.make_sharded_train_step(cfg, optimizer, mesh)
    state = parallel.replicate(
        mn.init_train_state(mn.init(jax.random.key(0), cfg), optimizer, jax.random.key(1)), mesh
    )
    losses = []
    for t in range(40):
        episodes = mn.synthetic.synthetic_episodes(jax.random.key(t), cfg, batch, noise=0.1)
        state, metrics = step(state, *parallel.shard_episodes(episodes, mesh))
        losses.append(float(metrics["loss"]))
    assert all(np.isfinite(losses))
    assert jax.tree.leaves(state.params)[0].dtype == jnp.float32
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    # Chance is 9 queries * ln 3 = 9.9 per task.
    assert last < 0.8 * first, (first, last, losses)


# ----------------------------------------------------------------------------- subprocesses
def test_four_devices_match_one_device(workers):
    group, out = workers["devices"]
    # The reference, computed meanwhile in this process on one device with the library's
    # plain (unsharded) train step, on the same episodes and initial state.
    cfg = worker.config()
    optimizer = worker.optimizer(cfg)
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(3), cfg, worker.META_BATCH)
    step = mn.make_train_step(cfg, optimizer, validate=False)
    state, metrics = step(worker.initial_state(cfg, optimizer), support, query)
    reference = worker.flat_params(state.params)
    group.wait()
    r = json.loads(out.read_text())
    four = r["mesh4"]
    assert four["summary"] == "devices: 4 (cpu), processes: 1, mesh: (4,), per-device meta-batch: 1"
    # Inputs: the task axis split over the 4 devices, one task each.
    assert four["input_spec"] == "PartitionSpec('tasks',)" or four["input_spec"] == "P('tasks',)"
    assert four["input_shards"] == [[1, 0], [1, 1], [1, 2], [1, 3]]
    # Outputs: params, step, key and metrics replicated on all 4 devices; the state donated.
    assert four["param_replicated"] and four["param_devices"] == 4
    assert four["metric_replicated"] and four["step_replicated"] and four["key_replicated"]
    assert four["state_donated"]
    # Same loss, gradient norm and updated params (SGD with lr 0.5, see worker.optimizer) at
    # float32 tolerance: the gradient sums run in another order on 4 devices.
    np.testing.assert_allclose(four["loss"], float(metrics["loss"]), rtol=1e-5)
    np.testing.assert_allclose(four["grad_norm"], float(metrics["grad_norm"]), rtol=1e-4)
    initial = worker.flat_params(worker.initial_state(cfg, optimizer).params)
    assert four["params"].keys() == reference.keys()
    for name, value in reference.items():
        np.testing.assert_allclose(
            np.array(four["params"][name]), value, rtol=1e-4, atol=1e-5, err_msg=name
        )
    assert max(np.abs(reference[n] - initial[n]).max() for n in reference) > 1e-2  # a real step
    assert "not divisible by the 4 devices" in r["error"] and "4 or 8" in r["error"]


def test_two_processes_match_one_process(workers):
    group, tmp = workers["processes"]
    # The single-process reference, computed meanwhile with the library's own
    # (unsharded) train step on the episodes of the batch sampler itself.
    from metanet_jax import data

    cfg = worker.config()
    optimizer = worker.optimizer(cfg)
    step = mn.make_train_step(cfg, optimizer, validate=False)
    state = worker.initial_state(cfg, optimizer)
    images = worker.class_images()
    losses = []
    for t in range(worker.STEPS):
        episodes = data.sample_episodes(
            worker.data_key(t), images, cfg.ways, cfg.shots, cfg.queries_per_class,
            worker.META_BATCH,
        )  # fmt: skip
        state, metrics = step(state, *episodes)
        losses.append(float(metrics["loss"]))
    reference = worker.flat_params(state.params)

    group.wait()
    infos = [json.loads((tmp / f"process{i}.json").read_text()) for i in range(2)]
    assert [i["rows"] for i in infos] == [[0, 1], [2, 3]]  # each process sampled its own tasks
    for info in infos:
        assert (
            info["summary"]
            == "devices: 2 (cpu), processes: 2, mesh: (2,), per-device meta-batch: 2"
        )
        np.testing.assert_allclose(info["losses"], losses, rtol=1e-5)
        assert info["restored_equal"] and info["restored_step"] == worker.STEPS  # orbax
    saved = np.load(tmp / "params.npz")  # written by process 0 only
    assert sorted(saved.files) == sorted(reference)
    for name, value in reference.items():
        np.testing.assert_allclose(saved[name], value, rtol=1e-4, atol=1e-5, err_msg=name)
