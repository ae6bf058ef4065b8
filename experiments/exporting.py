"""Writes pretrained folders (`metanet_jax.pretrained`'s layout) from training runs.

`export(workdir, dest)` writes one from a run folder's best checkpoint, or re-exports a
pretrained folder, measuring its test accuracy here with the run's own protocol
(`experiments.protocol.evaluate_run`); `python -m experiments.export_pretrained` is its
program.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

import jax
import numpy as np

from experiments.protocol import evaluate_run, protocol
from metanet_jax.pretrained import (
    CONFIG_FILE,
    PARAMS_FILE,
    RESULTS_FILE,
    flatten_params,
    is_pretrained,
    load,
    save_params,
)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _validation_curve(workdir: Path) -> list[list[float]]:
    """`[[step, validation accuracy, wall time from the first record (s)], ...]`."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    from metanet_jax.logging_utils import read_metrics

    records = read_metrics(path)
    t0 = records[0].get("wall_time") if records else None
    out = []
    for r in records:
        if "validation_accuracy" in r:
            wall = r.get("wall_time")
            out.append(
                [int(r["step"]), float(r["validation_accuracy"]),
                 None if wall is None or t0 is None else round(float(wall - t0), 1)]
            )  # fmt: skip
    return out


def _mean_episodes_per_s(workdir: Path) -> float | None:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    from metanet_jax.logging_utils import read_metrics

    rates = [r["episodes_per_s"] for r in read_metrics(path) if "episodes_per_s" in r]
    return float(np.mean(rates)) if rates else None


def export(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    which: str = "best",
    evaluate: bool = True,
    datasets: str | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes a pretrained folder from a run folder (its `which` checkpoint) or re-exports a
    pretrained folder (re-measuring its test accuracy here).

    Args:
      source: a training run's workdir (`checkpoints/`, `config.json`, maybe `results.json`
        and `metrics.jsonl`) or a pretrained folder (e.g. one written on a GPU).
      dest: the folder to write (replaced atomically; must not exist unless `overwrite`).
      which: "best" or "latest" checkpoint (run folders only).
      evaluate: measure the test accuracy here with `evaluate_run` (the run's protocol);
        without it the training run's own test numbers are recorded (as measured there).
      datasets: offline data folder for the evaluation.
      info: extra entries for results.json (e.g. `hardware`, `flagfile`, `command`).
      overwrite: replace an existing `dest`.

    Returns:
      The content of the written results.json.

    Raises:
      FileExistsError: `dest` exists and not `overwrite`. FileNotFoundError, ValueError,
        checkpointing.CheckpointError: the source cannot be read.
    """
    from metanet_jax import logging_utils

    source, dest = Path(source), Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")
    config, params, meta = load(source, which)
    params = jax.device_get(params)
    record = _source_record(source, meta)
    flags = record.flags()
    results = _recorded_results(source, dest, meta, record)
    prior_run = results["training_run"]
    if evaluate:
        t0 = time.time()
        result, proto = evaluate_run(params, config, flags, datasets=datasets)
        results.update(
            test_accuracy=result.mean,
            test_ci95=result.ci95,
            test_episodes=result.episodes,
            test_protocol=proto,
            test_platform=jax.default_backend(),
            test_time_s=round(time.time() - t0, 1),
        )
    else:
        results.update(
            test_accuracy=prior_run.get("test_accuracy"),
            test_ci95=prior_run.get("test_ci95"),
            test_episodes=prior_run.get("test_episodes"),
            test_protocol=protocol(flags),
            test_platform=prior_run.get("platform"),
        )
    results.update(info or {})
    results["versions"] = logging_utils.library_versions()
    _write_folder(dest, params, record.config, results)
    return results


# What the training run measured, kept in results.json's `training_run`.
_RUN_MEASURES = ("test_accuracy", "test_ci95", "test_episodes", "platform", "devices",
                 "evaluated_step", "best_validation_accuracy", "mnist_accuracy", "mnist_ci95",
                 "mnist_episodes")  # fmt: skip
# What an export measures itself (only these are top-level in its results.json).
_EXPORT_MEASURES = frozenset({"test_accuracy", "test_ci95", "test_episodes", "test_protocol",
                              "test_platform", "test_time_s", "mnist_accuracy", "mnist_ci95",
                              "mnist_episodes", "versions", "params", "name"})  # fmt: skip


class _Record(NamedTuple):
    """What the source folder recorded."""

    config: dict[str, Any]  # its config.json
    results: dict[str, Any]  # its results.json
    training_run: dict[str, Any] | None  # a pretrained folder's `training_run`

    def flags(self) -> dict[str, Any]:
        return dict(self.config.get("flags") or {})


def _source_record(source: Path, meta: Mapping[str, Any]) -> _Record:
    """The record of a run folder or a pretrained folder."""
    if is_pretrained(source):
        run_results = dict(meta.get("results") or {})
        saved = json.loads((source / CONFIG_FILE).read_text())
        return _Record(saved, run_results, run_results.get("training_run"))
    config_path = source / CONFIG_FILE
    if config_path.is_file():
        saved = json.loads(config_path.read_text())
    else:  # checkpoints carry the flags and the model configuration too
        saved = {"flags": dict(meta.get("flags") or {}), "model_config": meta.get("model_config")}
    results_path = source / RESULTS_FILE
    run_results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return _Record(saved, run_results, None)


def _recorded_results(
    source: Path, dest: Path, meta: Mapping[str, Any], record: _Record
) -> dict[str, Any]:
    """results.json of the export before its own measurements: the run's record."""
    run_results, prior_run = record.results, record.training_run
    if prior_run is None:
        prior_run = {k: run_results[k] for k in _RUN_MEASURES if run_results.get(k) is not None}
    results: dict[str, Any] = {
        "name": dest.name,
        "config": record.flags(),
        "model_config": record.config.get("model_config"),
        "steps": run_results.get("steps", meta.get("step")),
        "evaluated_step": meta.get("step"),
        "best_validation_accuracy": run_results.get("best_validation_accuracy"),
        "wall_time_s": run_results.get("wall_time_s", meta.get("wall_time_s")),
        "episodes_per_s": run_results.get("episodes_per_s") or _mean_episodes_per_s(source),
        "platform": run_results.get("platform"),
        "devices": run_results.get("devices"),
        "processes": run_results.get("processes"),
        "hardware": run_results.get("hardware"),
        "validation_curve": run_results.get("validation_curve") or _validation_curve(source),
        "training_run": prior_run,
    }
    # What the source recorded beside (flagfile, command, how the training stopped, ...); its
    # measurements stay in `training_run` (only this export's own are top-level).
    for k, v in run_results.items():
        if k not in results and k not in _EXPORT_MEASURES and v is not None:
            results[k] = v
    return results


def _write_folder(dest: Path, params, saved_config, results: dict[str, Any]) -> None:
    """Writes the pretrained folder into a temporary folder, then renames it to `dest`."""
    from metanet_jax import logging_utils

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_params(tmp / PARAMS_FILE, params)
        logging_utils.write_json_atomic(tmp / CONFIG_FILE, saved_config)
        results["params"] = {
            "file": PARAMS_FILE,
            "count": int(sum(np.size(v) for v in flatten_params(params).values())),
            "bytes": (tmp / PARAMS_FILE).stat().st_size,
            "sha256": _sha256(tmp / PARAMS_FILE),
        }
        logging_utils.write_json_atomic(tmp / RESULTS_FILE, results)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
