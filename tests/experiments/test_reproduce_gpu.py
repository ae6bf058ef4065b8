"""benchmarks/reproduce_gpu.py, the prepared GPU script: its --smoke path on the CPU, without
TensorFlow, TFDS, TensorBoard or matplotlib, writes models the pretrained tools load."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

import metanet_jax as mn

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "reproduce_gpu.py"


def _module():
    spec = importlib.util.spec_from_file_location("reproduce_gpu", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_smoke_run_stops_on_its_time_budget_and_leaves_a_loadable_model(tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, str(SCRIPT), "--smoke", "--synthetic", f"--out={out}",
            f"--work={tmp_path / 'work'}", "--only=previous_20way_metanet", "--budget_s=14",
            "--reserve_s=4", "--model_flags=--attention_scale=10",
            "--block_imports=tensorflow,tensorflow_datasets,tensorboard,matplotlib"]  # fmt: skip
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "note: tensorboard is not installed" in proc.stdout
    folder = out / "previous_20way_metanet"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "params.npz", "results.json"]
    with np.load(folder / "params.npz", allow_pickle=False) as f:
        assert f.files
    results = json.loads((folder / "results.json").read_text())
    # Stopped by the time budget long before its planned steps, then tested.
    assert results["stopped"] == "time budget"
    assert 1 <= results["steps"] < results["planned_steps"] == 10**6
    assert results["test_episodes"] == 4 and results["test_platform"] == "cpu"
    assert results["config"]["ways"] == 20 and results["config"]["split"] == "previous"
    assert results["command"].startswith(
        "python -m experiments.omniglot --flagfile=experiments/flags/previous_20way_metanet.flags"
    )
    assert "--attention_scale=10" in results["command"]
    config, params = mn.load_pretrained(folder)
    assert config.ways == 20 and config.output_units == 20 and config.conv_channels == 4
    assert config.attention_scale == 10  # --model_flags reached the model


def test_model_flags_may_not_set_what_the_script_sets(capsys):
    module = _module()
    assert module._args(["--model_flags=--train_ways=5,20 --rep_chunks=1"]).model_flags == [
        "--train_ways=5,20",
        "--rep_chunks=1",
    ]
    for bad, says in (("--steps=9", "--episodes_5way"), ("--meta_batch=4", "--meta_batch"),
                      ("rep_chunks=1", "--name=value")):  # fmt: skip
        try:
            module._args([f"--model_flags={bad}"])
        except SystemExit as stop:
            assert stop.code == 2
        else:
            raise AssertionError(f"--model_flags={bad} was accepted")
        assert says in capsys.readouterr().err


def test_missing_caches_are_named_before_any_work(tmp_path, monkeypatch):
    monkeypatch.setenv("METANET_DATA_DIR", str(tmp_path))
    (problem,) = _module().check_data(synthetic=False)
    assert "omniglot_background_v2.npz, omniglot_evaluation_v2.npz" in problem
    assert str(tmp_path / "cache") in problem and "docs/SCALING.md" in problem
    assert _module().check_data(synthetic=True) == []
