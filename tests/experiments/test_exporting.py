"""experiments.exporting: a run exported as a pretrained folder (no pickle), loaded again, and
the evaluation program that reproduces its recorded accuracy."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import jax
import numpy as np
import pytest

import metanet_jax as mn
from experiments import exporting, train
from metanet_jax import evaluation
from tests.experiments.conftest import TINY_FLAGS, tiny_spec

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny trained run (more output units than ways) and its export."""
    base = tmp_path_factory.mktemp("pretrained")
    spec = tiny_spec(base / "run", max_ways=4, steps=4, seed=3)
    run_results = train.train_and_evaluate(spec)
    results = exporting.export(spec.workdir, base / "pre" / "tiny", info={"hardware": "test"})
    return spec, run_results, base / "pre" / "tiny", results


def test_export_writes_params_config_results_without_pickle(trained):
    spec, run_results, folder, results = trained
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.npz", "results.json"]
    # Every array file reads without pickle; no member is an object array.
    with np.load(folder / "params.npz", allow_pickle=False) as f:
        assert all(f[k].dtype != object for k in f.files)
        names = set(f.files)
    with zipfile.ZipFile(folder / "params.npz") as z:
        assert all(n.endswith(".npy") for n in z.namelist())
    # The params only: the checkpoint's params and nothing of the optimiser state.
    _, ckpt_params = evaluation.load_checkpoint(spec.workdir, "best")
    flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_leaves_with_path(ckpt_params)}
    assert len(names) == len(flat)
    saved = json.loads((folder / "results.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert config["flags"]["max_ways"] == 4 and config["model_config"]["max_ways"] == 4
    for key in ("ways", "shots", "split", "eval_queries_per_class", "eval_batch"):
        assert saved["config"][key] == spec.to_dict()[key]
    assert saved["steps"] == spec.optim.steps == run_results["steps"]
    assert saved["wall_time_s"] == pytest.approx(run_results["wall_time_s"])
    assert saved["evaluated_step"] == run_results["evaluated_step"]
    assert saved["hardware"] == "test" and saved["test_platform"] == "cpu"
    assert saved["test_episodes"] == spec.schedule.test_episodes
    # Measured again here on the run's own protocol: the training loop's own final test.
    assert saved["test_accuracy"] == pytest.approx(run_results["test_accuracy"], abs=1e-6)
    assert saved["test_ci95"] == pytest.approx(run_results["test_ci95"], abs=1e-6)
    assert saved["training_run"]["test_accuracy"] == run_results["test_accuracy"]
    assert saved["test_protocol"] == {
        "dataset": "synthetic", "split": "standard", "subset": "test", "ways": 3, "shots": 1,
        "queries_per_class": 2, "episodes": 8, "seed": train.TEST_SEED, "batch": 4,
    }  # fmt: skip


def test_load_pretrained_gives_the_checkpoint_params(trained):
    spec, _, folder, _ = trained
    config, params = mn.load_pretrained(str(folder))
    ckpt_config, ckpt_params = evaluation.load_checkpoint(spec.workdir, "best")
    assert config == ckpt_config
    assert jax.tree.structure(params) == jax.tree.structure(ckpt_params)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ckpt_params), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_evaluate_program_reproduces_the_recorded_accuracy(trained, tmp_path):
    """`python -m experiments.evaluate --workdir=<pretrained>` alone re-runs the recorded
    protocol and prints the recorded accuracy (to 0.05 points)."""
    _, _, folder, results = trained
    # No JAX_PLATFORMS: JAX probes its backends as for a user, and the program keeps its
    # "Unable to initialize backend 'tpu'" INFO record out of the log.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    out = subprocess.run(
        [sys.executable, "-m", "experiments.evaluate", f"--workdir={folder}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    match = re.search(r"^accuracy (\d\.\d{4}) \+- (\d\.\d{4}) \(95% CI, (\d+) episodes\)$",
                      out.stdout, re.M)  # fmt: skip
    assert match, out.stdout
    assert float(match[1]) == pytest.approx(results["test_accuracy"], abs=5e-4)
    assert int(match[3]) == results["test_episodes"]
    assert "recorded: accuracy" in out.stdout and "(same protocol)" in out.stdout
    saved = json.loads((folder / "eval_synthetic_test_3way1shot.json").read_text())
    assert saved["checkpoint"] == "pretrained" and saved["batch"] == 4
    assert "tpu" not in out.stderr.lower()


def test_export_program_records_the_flagfile_of_an_absolute_workdir(trained, tmp_path):
    """Issue 11: a run started with an absolute `--workdir` is exported with the flagfile
    whose `--workdir` names the same folder relative to the current folder (recorded with
    the training command it gives); `--run_flagfile` is the program's flag for it, and absl's
    `--flagfile` (which read the training flags as the exporter's) is refused in one line."""
    spec, _, _, _ = trained
    run = Path(spec.workdir)
    assert run.is_absolute()
    flags_dir = run.parent / "experiments" / "flags"
    flags_dir.mkdir(parents=True, exist_ok=True)
    flagfile = flags_dir / "tiny.flags"
    flagfile.write_text("\n".join([*TINY_FLAGS, "--max_ways=4", "--seed=3", "--workdir=run"]))
    env = dict(
        os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )

    def export(*args):
        return subprocess.run(
            [sys.executable, "-m", "experiments.export_pretrained", f"--workdir={run}",
             f"--pretrained_dir={tmp_path}", *args],
            cwd=run.parent, capture_output=True, text=True, timeout=300, env=env,
        )  # fmt: skip

    out = export("--name=found")
    assert out.returncode == 0, out.stderr
    saved = json.loads((tmp_path / "found" / "results.json").read_text())
    assert saved["flagfile"] == "experiments/flags/tiny.flags"
    # The flagfile holds every flag the run set: the command adds none.
    assert (
        saved["command"] == "python -m experiments.omniglot --flagfile=experiments/flags/tiny.flags"
    )
    # absl's --flagfile: one line naming --run_flagfile, nothing written.
    out = export("--name=refused", f"--flagfile={flagfile}")
    assert out.returncode == 1
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "--flagfile is refused" in lines[0], out.stderr
    assert "--run_flagfile=<path>" in lines[0]
    assert not (tmp_path / "refused").exists()
    out = export("--name=missing", "--run_flagfile=/no/such.flags")
    assert out.returncode == 1
    assert "--run_flagfile=/no/such.flags: no such file" in out.stderr
    assert not (tmp_path / "missing").exists()
