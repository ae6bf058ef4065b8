"""Metrics writers (jsonl + TensorBoard event files), results files, plots."""

from __future__ import annotations

import json
import struct

import numpy as np
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

from metanet_jax import logging_utils


def _read_events(path):
    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        (length,) = struct.unpack("<Q", data[pos : pos + 8])
        assert struct.unpack("<I", data[pos + 8 : pos + 12])[0] == masked_crc32c(
            data[pos : pos + 8]
        )
        body = data[pos + 12 : pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])[0] == (
            masked_crc32c(body)
        )
        events.append(event_pb2.Event.FromString(body))
        pos += 16 + length
    return events


def test_metrics_go_to_jsonl_and_tensorboard(tmp_path):
    writer = logging_utils.MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.5, "accuracy": 0.5})
    writer.write(2, {"loss": 1.5})
    writer.close()
    records = logging_utils.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2] and records[0]["loss"] == 2.5
    (event_file,) = (tmp_path / "tensorboard").iterdir()
    events = _read_events(event_file)
    scalars = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
    assert (1, "loss", 2.5) in scalars and (2, "loss", 1.5) in scalars
    assert (1, "accuracy", 0.5) in scalars


def test_resume_drops_records_after_the_resumed_step(tmp_path):
    writer = logging_utils.MetricsWriter(tmp_path)
    for step in range(1, 6):
        writer.write(step, {"loss": float(step)})
    writer.close()
    writer = logging_utils.MetricsWriter(tmp_path, resume_step=3)
    writer.write(4, {"loss": 40.0})
    writer.close()
    records = logging_utils.read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_results_files_and_plots(tmp_path):
    results = {
        "test_accuracy": 0.9712,
        "test_ci95": 0.0031,
        "steps": 10,
        "wall_time_s": 65.0,
        "devices": 1,
        "processes": 1,
        "config": {"ways": 5},
        "versions": logging_utils.library_versions(),
    }
    json_path, md_path = logging_utils.write_results(tmp_path, results)
    assert json.loads(json_path.read_text())["test_accuracy"] == 0.9712
    text = md_path.read_text()
    assert "97.12% +- 0.31 (95% CI)" in text and "| ways | 5 |" in text
    assert "97.12%" in logging_utils.final_table(results)
    records = [{"step": 1, "loss": 3.0, "accuracy": 0.2}, {"step": 2, "validation_accuracy": 0.4}]
    png = logging_utils.plot_learning_curve(records, tmp_path / "curve.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    att = np.full((4, 3), 1 / 3, np.float32)
    png = logging_utils.plot_attention(
        att, np.zeros((3, 6, 6, 1)), np.arange(3), np.zeros((4, 6, 6, 1)), np.arange(4) % 3,
        tmp_path / "attention.png",
    )  # fmt: skip
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_progress_line_and_durations():
    line = logging_utils.progress_line(120, 2000, 14.24, 23.41, 0.8123, 592)
    assert line == "step 120/2000  episodes/s 14.2  loss 23.410  train acc 0.812  ETA 9m52s"
    assert logging_utils.format_duration(3 * 3600 + 4 * 60) == "3h04m"
    assert logging_utils.format_duration(42) == "42s"


def test_without_tensorboard_and_matplotlib_metrics_still_go_to_jsonl(tmp_path, monkeypatch):
    """As on an accelerator machine with only JAX's libraries: one notice each, no crash."""
    import sys

    for name in ("tensorboard", "tensorboard.compat", "tensorboard.compat.proto", "matplotlib"):
        monkeypatch.setitem(sys.modules, name, None)  # `import name` raises ImportError
    monkeypatch.setattr(logging_utils, "_NOTICES", set())
    notices = []
    monkeypatch.setattr(logging_utils.logging, "warning", lambda msg, *a: notices.append(msg % a))
    writer = logging_utils.MetricsWriter(tmp_path)
    writer.write(1, {"loss": 2.5})
    writer.close()
    assert logging_utils.read_metrics(tmp_path / "metrics.jsonl")[0]["loss"] == 2.5
    assert not (tmp_path / "tensorboard").exists()
    records = [{"step": 1, "loss": 3.0}]
    assert logging_utils.plot_learning_curve(records, tmp_path / "curve.png") is None
    assert logging_utils.plot_learning_curve(records, tmp_path / "curve.png") is None
    assert not (tmp_path / "curve.png").exists()
    (tmp_path / "again").mkdir()
    logging_utils.MetricsWriter(tmp_path / "again").close()
    assert len(notices) == 2, notices  # once per missing library and process
    assert "TensorBoard is not installed" in notices[0] and "matplotlib" in notices[1]
