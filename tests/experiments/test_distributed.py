"""`experiments.omniglot` itself on several processes and devices (CPU, synthetic data).

* two real processes on localhost (`--coordinator_address/--num_processes/--process_id`,
  gloo collectives, one CPU device each) end with the parameters of one plain single-device
  run of the same flags (read back from the orbax checkpoints); both processes take part in
  the checkpoint saves and in the restore of the best one for the test; only process 0
  writes the workdir's logs and results;
* one process with 4 forced host devices (`--xla_force_host_platform_device_count=4`, set
  before JAX starts, hence a subprocess): the device-summary line, `devices: 4` in
  results.json, the losses and parameters of the single-device run at float32 tolerance;
* one device in bfloat16 against the same run in float32 (the dtype alone): losses and
  fast-weight norms within the measured bound, float32 params;
* start-up errors: a meta-batch the devices do not divide, inconsistent distributed flags.

The training runs (two processes, the single-device reference, 4 devices, bfloat16) start
together when the first test that needs them runs, bounded by one timeout; all are killed on
a failure, on timeout and at the end of the module.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 300  # all the runs of the module; ~50 s on a loaded 2-core machine
STEPS = 3
META_BATCH = 4
# A tiny run of 4 tasks per step, validated and checkpointed at its last step only.
FLAGS = [
    "--dataset=synthetic",
    "--synthetic_size=8",
    "--conv_channels=3",
    "--num_conv_layers=1",
    "--hidden_units=5",
    "--ways=3",
    "--queries_per_class=2",
    "--eval_queries_per_class=2",
    "--rep_chunks=2",
    f"--meta_batch={META_BATCH}",
    "--eval_every=1000",
    "--eval_episodes=4",
    "--test_episodes=4",
    "--eval_batch=4",
    "--checkpoint_every=1000",
    "--log_every=1",
]
# What bfloat16 compute changes in these runs (one device, the same flags), relative to
# float32: the largest change of a logged value over the STEPS steps, measured with
# --seed=0, 1, 2, 3 after the Flax-module networks (whose init draws other numbers):
# seed 0 (the test's): 2.7e-4, 8.3e-4, 7.4e-3. Bounds: the maxima plus half.
BF16_MEASURED = {
    "loss": 1.4e-3,
    "example_fast_weight_norm": 2.4e-3,
    "task_fast_weight_norm": 1.4e-2,
}


def _env(devices: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    xla = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
    if not any(f.startswith("--xla_backend_optimization_level") for f in xla):
        xla.append("--xla_backend_optimization_level=0")
    xla.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(xla)
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for name in ("SLURM_STEP_ID", "OMPI_COMM_WORLD_SIZE", "TPU_WORKER_HOSTNAMES", "JOBSET_NAME"):
        env.pop(name, None)  # no cluster auto-detection in the single-process runs
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _program(workdir, *extra) -> list[str]:
    return [sys.executable, "-m", "experiments.omniglot", f"--workdir={workdir}", *FLAGS, *extra]


class _Proc:
    """A program run whose stdout and stderr go to files (no pipe can fill up)."""

    def __init__(self, name, cmd, env, logdir):
        self.name, self.cmd = name, cmd
        self.out_path, self.err_path = logdir / f"{name}.out", logdir / f"{name}.err"
        with open(self.out_path, "w") as out, open(self.err_path, "w") as err:
            self.popen = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=err)
        self.pid = self.popen.pid

    @property
    def stdout(self) -> str:
        return self.out_path.read_text()

    @property
    def stderr(self) -> str:
        return self.err_path.read_text()

    def kill(self):
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()


def _wait(procs, deadline):
    """Waits for all of `procs`; kills every one of them when one fails or time runs out."""
    try:
        for p in procs:
            p.popen.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"{[p.name for p in procs]} ran over {TIMEOUT_S} s and were killed")
    failed = [p for p in procs if p.popen.returncode != 0]
    for p in procs:
        p.kill()
    if failed:
        p = failed[0]
        pytest.fail(f"{p.name} exited with {p.popen.returncode}:\n{p.stderr[-4000:]}")


class _Runs:
    """The module's training runs, started at once, waited for by the tests that read them."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.logs = tmp / "logs"
        self.logs.mkdir()
        self.start = time.time()
        self.procs: list[_Proc] = []
        self.address = f"127.0.0.1:{_free_port()}"
        self.single = self._start("single", [tmp / "single", f"--steps={STEPS}"])
        self.four = self._start("four", [tmp / "four", f"--steps={STEPS}"], 4)
        self.single_bf16 = self._start(
            "single_bf16", [tmp / "single_bf16", f"--steps={STEPS}", "--compute_dtype=bfloat16"]
        )
        self.two = [
            self._start(
                f"two_{i}",
                [
                    tmp / "two",
                    f"--steps={STEPS}",
                    f"--coordinator_address={self.address}",
                    "--num_processes=2",
                    f"--process_id={i}",
                ],  # fmt: skip
            )
            for i in range(2)
        ]

    def _start(self, name, args, devices=1) -> _Proc:
        p = _Proc(name, _program(*args), _env(devices), self.logs)
        self.procs.append(p)
        return p

    def deadline(self) -> float:
        return self.start + TIMEOUT_S

    def kill(self):
        for p in self.procs:
            p.kill()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    r = _Runs(tmp_path_factory.mktemp("distributed"))
    yield r
    r.kill()


def _results(workdir) -> dict:
    return json.loads((Path(workdir) / "results.json").read_text())


def _losses(workdir) -> list[float]:
    records = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def _final_params(workdir, initial=False) -> dict[str, np.ndarray]:
    """The params of the checkpoint of step STEPS (`initial`: those of step 0, the init of
    `experiments.train.train_and_evaluate` with --seed=0)."""
    import jax

    from metanet_jax import checkpointing, evaluation

    config, _, _ = evaluation.load_checkpoint_with_meta(workdir, "latest")
    state = evaluation.fresh_state(config)
    if not initial:
        with checkpointing.Checkpointer(evaluation.checkpoint_dir(workdir), read_only=True) as ck:
            state, _ = ck.restore(STEPS, state)
    leaves = jax.tree_util.tree_leaves_with_path(state.params)
    return {jax.tree_util.keystr(k): np.asarray(v) for k, v in leaves}


# ----------------------------------------------------------------------------- processes
def test_two_processes_match_one_process_and_only_process_0_writes(runs):
    _wait([*runs.two, runs.single], runs.deadline())
    two, single = runs.tmp / "two", runs.tmp / "single"
    first, second = runs.two
    summary = "devices: 2 (cpu), processes: 2, mesh: (2,), per-device meta-batch: 2"
    assert summary in first.stderr
    assert f"test (checkpoint of step {STEPS})" in first.stderr  # restored by both
    assert "test accuracy" in first.stdout
    # Process 1 logs warnings only and prints no results.
    assert "test accuracy" not in second.stdout and not re.search(r"step \d+/", second.stderr)
    assert summary not in second.stderr

    results = _results(two)
    assert results["processes"] == 2 and results["devices"] == 2
    assert results["steps"] == STEPS and results["evaluated_step"] == STEPS
    assert _results(single)["processes"] == 1 and _results(single)["devices"] == 1
    # Only process 0 writes metrics: one TensorBoard file, named with its pid, and one
    # record per step.
    events = sorted((two / "tensorboard").iterdir())
    assert [int(e.name.split(".")[-2]) for e in events] == [first.pid], (events, second.pid)
    records = [json.loads(x) for x in (two / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "validation_accuracy" in r] == [STEPS]
    assert [r["step"] for r in records if "test_accuracy" in r] == [STEPS]

    # The same episodes and per-task keys as the single-device run: the same training up
    # to the order of float32 sums in the gradient all-reduce (measured: <= 6e-8).
    np.testing.assert_allclose(_losses(two), _losses(single), rtol=1e-5)
    a, b = _final_params(two), _final_params(single)
    assert a.keys() == b.keys()
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)
    initial = _final_params(single, initial=True)
    assert max(np.abs(b[n] - initial[n]).max() for n in b) > 1e-3  # training moved them


# ----------------------------------------------------------------------------- devices
def _records(workdir, key) -> list[float]:
    records = [json.loads(x) for x in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]
    return [r[key] for r in records if key in r and "loss" in r]


def test_four_host_devices_match_one_device(runs):
    _wait([runs.four, runs.single], runs.deadline())
    assert (
        "devices: 4 (cpu), processes: 1, mesh: (4,), per-device meta-batch: 1" in runs.four.stderr
    )
    results = _results(runs.tmp / "four")
    assert results["devices"] == 4 and results["processes"] == 1
    # The same episodes and keys; float32 sums in another order (as two processes).
    np.testing.assert_allclose(_losses(runs.tmp / "four"), _losses(runs.tmp / "single"), rtol=1e-5)
    a, b = _final_params(runs.tmp / "four"), _final_params(runs.tmp / "single")
    assert a.keys() == b.keys()
    for name in b:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-5, err_msg=name)


def test_bfloat16_changes_a_run_within_the_measured_bound(runs):
    _wait([runs.single_bf16, runs.single], runs.deadline())
    bf16, f32 = runs.tmp / "single_bf16", runs.tmp / "single"
    assert _results(bf16)["model_config"]["compute_dtype"] == "bfloat16"
    losses, reference = np.array(_losses(bf16)), np.array(_losses(f32))
    assert len(losses) == STEPS and np.all(np.isfinite(losses)), losses
    changes = {"loss": float(np.max(np.abs(losses / reference - 1)))}
    for key in ("example_fast_weight_norm", "task_fast_weight_norm"):
        a, b = np.array(_records(bf16, key)), np.array(_records(f32, key))
        changes[key] = float(np.max(np.abs(a / b - 1)))
    print("\nbfloat16 run vs float32 run:", {k: f"{v:.1e}" for k, v in changes.items()})
    for key, measured in BF16_MEASURED.items():
        assert changes[key] <= 1.5 * measured, (key, changes)
    assert changes["loss"] > 0  # bfloat16 did run
    params = _final_params(bf16)
    assert all(v.dtype == np.float32 for v in params.values())


def test_a_meta_batch_the_devices_do_not_divide_stops_before_any_work(tmp_path):
    workdir = tmp_path / "never"
    out = subprocess.run(
        _program(workdir, "--meta_batch=6", "--steps=1"),
        cwd=ROOT, env=_env(4), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, out.stderr
    assert "--meta_batch=6 is not divisible by the 4 devices" in lines[0]
    assert "4 or 8" in lines[0]
    assert not workdir.exists()
    assert "starting a new run" not in out.stderr


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize(
    "flags, named",
    [
        (["--num_processes=2", "--process_id=2", "--coordinator_address=127.0.0.1:1234"],
         "--process_id=2 must be in [0, --num_processes=2)"),
        (["--process_id=0"], "must be set together"),
        (["--num_processes=2"], "must be set together"),
        (["--coordinator_address=127.0.0.1:1234", "--num_processes=2"], "must be set together"),
        (["--num_processes=0"], "--num_processes must be an integer in [1, 65536]"),
        (["--process_id=-1"], "--process_id must be an integer in [0, 65535]"),
        (["--coordinator_address=nohost", "--num_processes=2", "--process_id=0"],
         "--coordinator_address=nohost must be host:port"),
    ],
)  # fmt: skip
def test_bad_distributed_flags_exit_1_with_one_line(tmp_path, flags, named):
    workdir = tmp_path / "never"
    out = subprocess.run(
        _program(workdir, *flags), cwd=ROOT, env=_env(), capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    assert out.returncode == 1, out.stderr
    lines = [x for x in out.stderr.splitlines() if "error" in x]
    assert len(lines) == 1, out.stderr
    assert named in lines[0], lines[0]
    assert not workdir.exists()
    assert not re.search(r"jax\.distributed|Gloo", out.stderr)
