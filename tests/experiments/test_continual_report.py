"""The continual-learning record (experiments/continual_report.py): the seeds' files gathered
as written, the section's numbers computed by hand from them, and the report's round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from experiments import continual_report, reporting


def _run(root: Path, seed: int, before: float, omniglot: list[float], mnist_steps=1000) -> Path:
    """A fake continual workdir: `continual.json` with Omniglot accuracy `omniglot[i]` after
    500 * (i + 1) MNIST trials."""
    folder = root / f"continual_seed{seed}"
    folder.mkdir(parents=True)
    curve = [{"mnist_trials": 0, "omniglot_accuracy": before, "omniglot_ci95": 0.0125,
              "mnist_accuracy": None}]  # fmt: skip
    curve += [
        {"mnist_trials": 500 * (i + 1), "omniglot_accuracy": a, "omniglot_ci95": 0.01,
         "mnist_accuracy": 0.5 + 0.1 * i}
        for i, a in enumerate(omniglot)
    ]  # fmt: skip
    deltas = [a - before for a in omniglot]
    run = {
        "config": {"seed": seed, "omniglot_steps": 20000, "mnist_steps": mnist_steps},
        "omniglot_accuracy_before": before, "curve": curve,
        "omniglot_change_min": min(deltas), "omniglot_change_max": max(deltas),
        "wall_time_s": 725.0,
    }  # fmt: skip
    (folder / "continual.json").write_text(json.dumps(run))
    return folder


def test_runs_are_gathered_as_written_by_seed_and_their_section_is_computed_from_them(tmp_path):
    two = _run(tmp_path, 2, 0.80, [0.79, 0.815])
    zero = _run(tmp_path, 0, 0.90, [0.883, 0.90])
    record = continual_report.gather([two, zero])
    assert record["paper_band_points"] == [-1.7, 1.24]
    assert record["runs"] == [
        json.loads((zero / "continual.json").read_text()),
        json.loads((two / "continual.json").read_text()),
    ]
    path = tmp_path / "docs" / "continual" / "continual.json"
    assert continual_report.write([two, zero], path) == [str(path)]
    assert path.with_suffix(".png").stat().st_size > 0
    assert continual_report.write([zero, two], path, check=True) == []  # order does not matter

    text = "\n".join(continual_report.section(path))
    # seed 0: before 90.00 +- 1.25; changes -1.70 and 0.00; final 0.00; final MNIST 60.00.
    assert "| 0 | 90.00 +- 1.25 | -1.70 | +0.00 | +0.00 | 60.00 | 20,000 + 1,000 | 12m05s |" in text
    # seed 2: before 80.00; changes -1.00 and +1.50, final +1.50.
    assert "| 2 | 80.00 +- 1.25 | -1.00 | +1.50 | +1.50 | 60.00 |" in text
    assert "ranged from -1.70 to +1.50 points (paper: -1.70 to +1.24)" in text
    assert "](continual/continual.png)" in text
    assert "Not run yet" in "\n".join(continual_report.section(tmp_path / "none.json"))


def test_unfinished_runs_and_repeated_seeds_are_refused(tmp_path):
    short = _run(tmp_path / "a", 0, 0.9, [0.9], mnist_steps=1000)  # stops at 500 of 1000
    with pytest.raises(ValueError, match="stopped at 500 of 1000 trials.*resumes"):
        continual_report.gather([short])
    one, other = _run(tmp_path / "b", 1, 0.9, [0.9, 0.9]), _run(tmp_path / "c", 1, 0.8, [0.8, 0.8])
    with pytest.raises(ValueError, match=r"repeat a seed: \[1, 1\]"):
        continual_report.gather([one, other])


def test_the_report_gathers_continual_runs_and_renders_them_beside_the_models(
    tmp_path, monkeypatch
):
    """`report <continual workdirs>` writes the record, then the report of `pretrained`, with
    the section rendered from the record; `report pretrained --check` then finds it exact."""
    runs = [_run(tmp_path / "runs", s, 0.85, [0.84, 0.86]) for s in range(2)]
    (tmp_path / "pretrained").mkdir()
    out, record = tmp_path / "RESULTS.md", tmp_path / "continual" / "continual.json"
    monkeypatch.chdir(tmp_path)
    kwargs = dict(output=out, readme=None, flags_dir=None, ablations_dir=None,
                  continual_record=record)  # fmt: skip
    changed = reporting.build([str(r) for r in runs], **kwargs)
    assert changed == [str(record), str(out)]
    assert "python -m experiments.report pretrained`" in out.read_text()
    assert "| 1 | 85.00 +- 1.25 | -1.00 | +1.00 | +1.00 | 60.00 |" in out.read_text()
    assert reporting.build(["pretrained"], check=True, **kwargs) == []
