"""experiments.records: every committed record reads into its type and writes back as it was,
and both ablation formats read into the same fields."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments.records import AblationRow, AblationTable, EvalRecord, RunResults

ROOT = Path(__file__).resolve().parents[2]
RESULTS = sorted((ROOT / "pretrained").glob("*/results.json"))
EVALS = sorted((ROOT / "pretrained").glob("*/eval_*.json"))
ABLATIONS = sorted((ROOT / "docs" / "ablations").glob("*.json"))


def _load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_the_committed_records_exist():
    assert RESULTS and EVALS and ABLATIONS


@pytest.mark.parametrize("path", RESULTS, ids=lambda p: p.parent.name)
def test_every_results_json_round_trips_and_reads_its_contract_keys(path):
    d = _load(path)
    r = RunResults.from_json(d, str(path))
    assert r.to_json() == d
    # The keys tools outside the package read, as attributes.
    assert r.config == d["config"] and isinstance(r.config["ways"], int)
    assert (r.test_accuracy, r.test_ci95, r.test_episodes) == (
        d["test_accuracy"], d["test_ci95"], d["test_episodes"]
    )  # fmt: skip
    assert (r.wall_time_s, r.steps, r.hardware) == (d["wall_time_s"], d["steps"], d["hardware"])
    assert r.flagfile == d["flagfile"] and r.test_protocol == d["test_protocol"]
    # Every key of these files is named by the record (none left to `extra`).
    assert r.extra == {}


@pytest.mark.parametrize("path", EVALS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_eval_json_round_trips(path):
    d = _load(path)
    e = EvalRecord.from_json(d, str(path))
    assert e.to_json() == d
    assert (e.accuracy, e.ci95, e.episodes) == (d["accuracy"], d["ci95"], d["episodes"])
    assert (e.data, e.ways, e.shots) == (d["data"], d["ways"], d["shots"])
    assert e.extra == {}


@pytest.mark.parametrize("path", ABLATIONS, ids=lambda p: p.name)
def test_every_ablation_file_and_row_round_trips(path):
    d = _load(path)
    table = AblationTable.from_json(d, str(path))
    assert table.to_json() == d
    assert table.heading == d.get("title", d.get("name"))
    assert len(table.rows) == len(d["rows"])
    for row, raw in zip(table.rows, d["rows"], strict=True):
        assert AblationRow.from_json(raw).to_json() == raw
        assert row.name == raw["name"] and row.steps == raw["steps"]
        assert row.validation_accuracy == raw.get("val_accuracy",
                                                  raw.get("best_validation_accuracy"))  # fmt: skip
        assert row.test_accuracy == raw.get("test_accuracy", raw.get("test_accuracy_record_only"))


def test_unknown_keys_and_explicit_nulls_are_kept():
    d = {"config": {"ways": 5}, "test_accuracy": 0.9, "best_validation_accuracy": None,
         "status_note": "stopped by hand", "extra": [1, 2]}  # fmt: skip
    r = RunResults.from_json(d)
    assert r.best_validation_accuracy is None and r.mnist_accuracy is None
    assert dict(r.extra) == {"status_note": "stopped by hand", "extra": [1, 2]}
    out = r.to_json()
    assert out == d and "best_validation_accuracy" in out and "mnist_accuracy" not in out
    assert RunResults.from_json({}) == RunResults() and RunResults().to_json() == {}


def test_a_written_record_writes_each_given_field_none_as_null():
    e = EvalRecord.written(accuracy=0.75, ci95=0.01, episodes=10, protocol=None)
    assert e.to_json() == {"accuracy": 0.75, "ci95": 0.01, "episodes": 10, "protocol": None}
    assert EvalRecord.from_json(e.to_json()) == e
    assert EvalRecord(accuracy=0.75, protocol=None).to_json() == {"accuracy": 0.75}


def test_both_ablation_formats_read_into_the_same_fields():
    simple = {"name": "a", "flags": "--x=1", "steps": 100, "wall_time_s": 9.5,
              "val_accuracy": 0.8, "val_ci95": 0.02, "val_episodes": 400,
              "test_accuracy": 0.81, "test_ci95": 0.03, "test_episodes": 200}  # fmt: skip
    plan = {"name": "a", "flags": ["--x=1"], "steps": 100, "wall_time_s": 9.5,
            "best_validation_accuracy": 0.8, "best_validation_ci95": 0.02,
            "validation_episodes": 400, "test_accuracy_record_only": 0.81,
            "test_ci95": 0.03, "test_episodes": 200, "best_validation_step": 75}  # fmt: skip
    a, b = AblationRow.from_json(simple), AblationRow.from_json(plan)
    for row in (a, b):
        assert (row.validation_accuracy, row.validation_ci95, row.validation_episodes) == (
            0.8, 0.02, 400
        )  # fmt: skip
        assert (row.test_accuracy, row.test_ci95, row.test_episodes) == (0.81, 0.03, 200)
    assert (a.best_validation_step, b.best_validation_step) == (None, 75)
    assert a.to_json() == simple and b.to_json() == plan
    # A row mixing the formats keeps each key as it was named.
    mixed = {"name": "m", "steps": 1, "wall_time_s": 1.0, "val_accuracy": 0.5,
             "test_accuracy_record_only": 0.4, "best_validation_accuracy": 0.6}  # fmt: skip
    m = AblationRow.from_json(mixed)
    assert m.validation_accuracy == 0.5 and m.test_accuracy == 0.4
    assert m.to_json() == mixed


def test_bad_records_are_refused_in_one_line():
    with pytest.raises(ValueError, match=r"^r\.json: test_accuracy='high' is not a number$"):
        RunResults.from_json({"test_accuracy": "high"}, "r.json")
    with pytest.raises(ValueError, match=r"^e\.json: episodes=True is not a number$"):
        EvalRecord.from_json({"episodes": True}, "e.json")
    with pytest.raises(ValueError, match="expected a JSON object"):
        EvalRecord.from_json([1], "e.json")
    row = {"name": "x", "steps": 1, "wall_time_s": 1.0, "val_accuracy": 0.5}
    with pytest.raises(ValueError, match=r"^t: row 0 \('x'\) lacks steps$"):
        AblationTable.from_json({"title": "T", "rows": [dict(row, steps=None)]}, "t")
    with pytest.raises(ValueError, match=r"^t: row 1 val_accuracy=92\.3 is not a fraction"):
        AblationTable.from_json({"title": "T", "rows": [row, dict(row, val_accuracy=92.3)]}, "t")
    with pytest.raises(ValueError, match="needs a string 'title'"):
        AblationTable.from_json({"rows": [row]}, "t")
    with pytest.raises(ValueError, match="needs a non-empty list 'rows'"):
        AblationTable.from_json({"name": "n", "rows": []}, "t")
