"""experiments.ablation: plan checks and the table row of a finished run (no training)."""

from __future__ import annotations

import json

import pytest

from experiments import ablation, ablation_report


def _plan(tmp_path, **changes):
    plan = {
        "name": "p",
        "base_flagfile": "experiments/flags/demo.flags",
        "runs": [{"name": "a", "flags": ["--steps=2"]}, {"name": "b", "flags": []}],
        **changes,
    }
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    return path


def test_load_plan_refuses_bad_plans(tmp_path):
    assert [r["name"] for r in ablation.load_plan(_plan(tmp_path))["runs"]] == ["a", "b"]
    with pytest.raises(ValueError, match="run names repeat"):
        ablation.load_plan(_plan(tmp_path, runs=[{"name": "a"}, {"name": "a"}]))
    with pytest.raises(FileNotFoundError, match="no flagfile"):
        ablation.load_plan(_plan(tmp_path, base_flagfile="nope.flags"))
    bad = _plan(tmp_path)
    bad.write_text(json.dumps({"name": "p", "runs": []}))
    with pytest.raises(ValueError, match="base_flagfile"):
        ablation.load_plan(bad)
    with pytest.raises(ValueError, match="eval_ways"):
        ablation.load_plan(_plan(tmp_path, eval_ways=[20, "x"]))


def test_command_puts_run_flags_after_the_flagfile(tmp_path):
    plan = ablation.load_plan(_plan(tmp_path, common_flags=["--eval_episodes=4"]))
    cmd = ablation.run_command(plan, plan["runs"][0], tmp_path / "w")
    assert cmd[-4:] == [
        "--flagfile=experiments/flags/demo.flags",
        "--eval_episodes=4",
        "--steps=2",
        f"--workdir={tmp_path / 'w'}",
    ]


def test_summarise_picks_best_and_final_validation(tmp_path):
    assert ablation.summarise(tmp_path) is None  # not finished
    rows = [
        {"step": 10, "loss": 3.0},
        {"step": 10, "validation_accuracy": 0.5, "validation_ci95": 0.1},
        {"step": 20, "validation_accuracy": 0.7, "validation_ci95": 0.05},
        {"step": 30, "validation_accuracy": 0.6, "validation_ci95": 0.04},
    ]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    results = {"steps": 30, "wall_time_s": 12.34, "episodes_per_s": 2.5, "test_accuracy": 0.9,
               "test_episodes": 7, "config": {"eval_episodes": 40}}  # fmt: skip
    (tmp_path / "results.json").write_text(json.dumps(results))
    row = ablation.summarise(tmp_path)
    assert (row["best_validation_accuracy"], row["best_validation_step"]) == (0.7, 20)
    assert (row["final_validation_accuracy"], row["final_validation_ci95"]) == (0.6, 0.04)
    assert row["validation_curve"] == [[10, 0.5], [20, 0.7], [30, 0.6]]
    assert (row["steps"], row["wall_time_s"], row["validation_episodes"]) == (30, 12.3, 40)
    assert row["validation_by_ways"] == {}


def test_validation_at_more_ways_is_measured_recorded_and_reported(tmp_path):
    assert ablation.eval_command(tmp_path, 20)[-4:] == [
        f"--workdir={tmp_path}", "--subset=validation", "--ways=20", "--name=validation_20way",
    ]  # fmt: skip
    # experiments.evaluate writes eval_<name>.json: the path the plan looks for.
    assert ablation.eval_path(tmp_path, 20) == tmp_path / "eval_validation_20way.json"
    (tmp_path / "metrics.jsonl").write_text(
        json.dumps({"step": 5, "validation_accuracy": 0.8, "validation_ci95": 0.02}) + "\n"
    )
    results = {
        "steps": 5,
        "wall_time_s": 3.0,
        "episodes_per_s": 1.0,
        "config": {"eval_episodes": 4},
    }
    (tmp_path / "results.json").write_text(json.dumps(results))
    for ways, acc in ((20, 0.61), (10, 0.72)):  # as experiments.evaluate writes them
        value = {"ways": ways, "accuracy": acc, "ci95": 0.03, "episodes": 4, "seed": 1}
        ablation.eval_path(tmp_path, ways).write_text(json.dumps(value))
    row = ablation.summarise(tmp_path)
    assert row["validation_by_ways"] == {
        "10": {"accuracy": 0.72, "ci95": 0.03, "episodes": 4},
        "20": {"accuracy": 0.61, "ci95": 0.03, "episodes": 4},
    }
    table = {
        "name": "t",
        "rows": [{"name": "a", **row}, {"name": "b", **row, "validation_by_ways": {}}],
    }
    path = tmp_path / "t.json"
    path.write_text(json.dumps(table))
    lines = [x for x in ablation_report.ablation_section(path) if x.startswith("|")]
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    first = [c.strip() for c in lines[2].strip("|").split("|")]
    second = [c.strip() for c in lines[3].strip("|").split("|")]
    at = header.index("validation 10-way")
    assert header[at + 1] == "validation 20-way" and header[at - 1] == "validation (95% CI)"
    assert first[at : at + 2] == ["72.00 +- 3.00", "61.00 +- 3.00"]
    assert second[at : at + 2] == ["", ""]
