"""The results report: the committed files are what the report writes, and each number lands
in its paper cell."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import reporting, train

ROOT = Path(__file__).resolve().parents[2]


def test_committed_results_readme_and_flagfiles_are_what_the_report_writes(monkeypatch):
    """`python -m experiments.report pretrained` would change nothing: docs/RESULTS.md, the
    README block and the flagfile headers agree with pretrained/."""
    monkeypatch.chdir(ROOT)
    assert reporting.build(["pretrained"], check=True) == []


def test_readme_states_the_demo_accuracy_in_percent_with_two_decimals():
    demo = ROOT / "pretrained" / "demo" / "results.json"
    readme = (ROOT / "README.md").read_text()
    block = readme[readme.index(reporting.README_BEGIN) : readme.index(reporting.README_END)]
    if not demo.is_file():
        assert "No pretrained model yet" in block or "pretrained/demo" not in block
        return
    accuracy = json.loads(demo.read_text())["test_accuracy"]
    assert f"**{100 * accuracy:.2f}%**" in block


def test_every_flagfile_opens_with_its_command():
    for path in sorted((ROOT / "experiments" / "flags").glob("*.flags")):
        first = path.read_text().splitlines()[0]
        program = "continual" if path.name.startswith("continual") else "omniglot"
        assert (
            first == f"# python -m experiments.{program} --flagfile=experiments/flags/{path.name}"
        )


def _source(root: Path, name: str, *, pretrained=True, evals=(), **flags) -> Path:
    """A fake model folder: results.json for `flags` (RunSpec defaults otherwise)."""
    folder = root / name
    folder.mkdir(parents=True)
    spec = train.RunSpec.from_flags({"workdir": f"workdirs/{name}", **flags})
    results = {
        "config": spec.to_dict(), "steps": spec.optim.steps, "wall_time_s": 3723.0,
        "test_accuracy": 0.9712, "test_ci95": 0.0031, "test_episodes": 1000,
        "hardware": "1 x NVIDIA H200", "command": f"python -m experiments.omniglot --x={name}",
    }  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))
    (folder / "config.json").write_text(json.dumps({"flags": spec.to_dict()}))
    if pretrained:
        (folder / "params.npz").write_bytes(b"")
    for e in evals:
        (folder / f"eval_{e['name']}.json").write_text(json.dumps(e))
    return folder


def _row(text: str, *start: str) -> str:
    prefix = "| " + " | ".join(start) + " |"
    rows = [line for line in text.splitlines() if line.startswith(prefix)]
    assert len(rows) == 1, (prefix, rows)
    return rows[0]


def test_numbers_land_in_their_paper_cells(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    models = tmp_path / "models"
    to20 = {"name": "a", "data": "omniglot/previous/test", "ways": 20, "shots": 1,
            "queries_per_class": 10, "episodes": 1000, "seed": train.TEST_SEED,
            "batch": 50, "accuracy": 0.9, "ci95": 0.01}  # fmt: skip
    mnist = {"name": "b", "data": "mnist/test", "ways": 10, "shots": 1, "queries_per_class": 10,
             "episodes": 400, "seed": train.MNIST_SEED, "batch": 50, "accuracy": 0.7512,
             "ci95": 0.02}  # fmt: skip
    _source(models, "prev5", split="previous", ways=5, max_ways=20, steps=40000,
            evals=[to20, mnist])  # fmt: skip
    _source(models, "std20", split="standard", ways=20, steps=20000, meta_batch=16)
    _source(models, "mlp5", split="previous", ways=5, architecture="mlp")  # MNIST flagfiles
    ablations = tmp_path / "ablations"
    reporting.write_ablation(
        ablations / "levers.json", "Levers at equal CPU time",
        [{"name": "authors' init", "flags": "--generator_init=authors", "steps": 3500,
          "wall_time_s": 300.0, "val_accuracy": 0.9231, "val_ci95": 0.0123, "val_episodes": 400}],
        description="One lever at a time.",
    )  # fmt: skip
    (ablations / "plan.json").write_text(json.dumps({  # as experiments/ablation.py writes it
        "name": "demo_levers", "description": "The demo's levers.",
        "base_flagfile": "experiments/flags/demo.flags", "common_flags": ["--steps=3500"],
        "command": "python -m experiments.ablation --plan=p.json",
        "rows": [{"name": "cosine", "description": "cosine decay",
                  "flags": ["--lr_schedule=cosine", "--warmup_steps=100"], "steps": 3500,
                  "wall_time_s": 442.0, "episodes_per_s": 9.45,
                  "best_validation_accuracy": 0.8798, "best_validation_ci95": 0.0095,
                  "best_validation_step": 2625, "final_validation_accuracy": 0.87,
                  "final_validation_ci95": 0.01, "validation_curve": [[875, 0.75]],
                  "validation_episodes": 400, "test_accuracy_record_only": 0.9095,
                  "test_episodes": 200}],
    }))  # fmt: skip
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{reporting.README_BEGIN}\nold\n{reporting.README_END}\nend\n")
    flags_dir = tmp_path / "flags"
    flags_dir.mkdir()
    (flags_dir / "std.flags").write_text("# Table 2\n--ways=20\n")
    kw = dict(output=tmp_path / "RESULTS.md", readme=readme, flags_dir=flags_dir,
              ablations_dir=ablations)  # fmt: skip
    changed = reporting.build(["models"], **kw)
    assert sorted(Path(p).name for p in changed) == ["README.md", "RESULTS.md", "std.flags"]
    text = (tmp_path / "RESULTS.md").read_text()
    # Previous split, MetaNet 5-way: the model's own test, its training and its test command.
    row = _row(text, "MetaNet", "5", "98.95")
    assert "| 97.12 +- 0.31 | 1,000 | `models/prev5` | 40,000 | 1h02m | 1 x NVIDIA H200 |" in row
    assert "`python -m experiments.evaluate --workdir=models/prev5` |" in row
    assert _row(text, "MetaNet", "10", "98.67").endswith("|  |  |  |  |  |  |  |")
    # The MLP model (MNIST flagfiles) is not a Table 1 entry; nothing else is either.
    assert text.count("`models/mlp5`") == 1  # the models table only
    # N-way -> K-way: 5 -> 20 from the eval file, with the flag that measures it.
    row = _row(text, "5", "20", "93.07")
    assert "| 90.00 +- 1.00 | 1,000 | `models/prev5` |" in row
    assert "--workdir=models/prev5 --ways=20` |" in row
    assert "97.12 +- 0.31" in _row(text, "5", "5", "98.95")
    # Standard split 20-way; a meta-batch of 16 shows in the steps.
    assert "| 97.12 +- 0.31 | 1,000 | `models/std20` | 20,000 x 16 tasks |" in _row(
        text, "20", "95.92"
    )
    # MNIST out of domain (episodes 400 = not the run's 1,000 test episodes: a flag).
    row = _row(text, "MetaNet", "74.8")
    assert "| 75.12 +- 2.00 | 400 | `models/prev5` |" in row and "--mnist --episodes=400`" in row
    assert _row(text, "MetaNet", "49.21 +- 0.96").startswith("| MetaNet | 49.21 +- 0.96 |  |")
    # The ablation table.
    assert "### Levers at equal CPU time" in text and "One lever at a time." in text
    assert _row(text, "authors' init") == (
        "| authors' init | `--generator_init=authors` | 3,500 | 5m00s |  | 92.31 +- 1.23 |  |  "
        "| 400 |  |  |  |"
    )
    assert "### demo_levers" in text and "Every run: `experiments/flags/demo.flags` with " in text
    assert _row(text, "cosine") == (
        "| cosine | `--lr_schedule=cosine --warmup_steps=100` | 3,500 | 7m22s | 9.45 | 87.98 +- "
        "0.95 | 2,625 | 87.00 +- 1.00 | 400 | 90.95 | 200 | cosine decay |"
    )
    # README block: the pretrained models (not the run folders), the rest of README kept.
    new = readme.read_text()
    assert new.startswith("intro\n<!-- results:begin -->") and new.endswith(
        "<!-- results:end -->\nend\n"
    )
    assert (
        "| `models/prev5` | MetaNet, Omniglot previous split, 5-way 1-shot | 97.12 +- 0.31" in new
    )
    # Flagfile header: the command line first, the comment kept.
    assert (flags_dir / "std.flags").read_text() == (
        "# python -m experiments.omniglot --flagfile=experiments/flags/std.flags\n"
        "# Table 2\n--ways=20\n"
    )
    # Deterministic: a second run changes nothing.
    assert reporting.build(["models"], **kw) == []


def test_standard_split_models_tested_at_other_ways_have_their_own_rows(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    to20 = {"name": "a", "data": "omniglot/standard/test", "ways": 20, "shots": 1,
            "queries_per_class": 10, "episodes": 1000, "seed": train.TEST_SEED,
            "batch": 50, "accuracy": 0.9198, "ci95": 0.0023}  # fmt: skip
    _source(tmp_path / "models", "std5", split="standard", ways=5, max_ways=20,
            train_ways=(5, 10, 15, 20), evals=[to20])  # fmt: skip
    text = reporting.results_markdown(
        reporting.find_sources(["models"]), ["models"], ablations_dir=None
    )
    row = _row(text, "20", "95.92", "5/10/15/20-way episodes, all layers augmented")
    assert "| 91.98 +- 0.23 | 1,000 | `models/std5` |" in row
    assert row.endswith("`python -m experiments.evaluate --workdir=models/std5 --ways=20` |")
    # Not in the standard split's own table (models trained and tested 20-way) ...
    assert _row(text, "20", "95.92", "").endswith("|  |  |  |  |  |  |  |")
    # ... and the model's own 5-way test stays there, not among the other ways.
    assert "`models/std5`" in _row(text, "5", "98.45")
    assert not [line for line in text.splitlines() if line.startswith("| 5 | 98.45 | 5 (")]


def test_a_model_recording_its_flagfile_adds_a_result_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = _source(tmp_path / "models", "demo", steps=3500)
    results = json.loads((folder / "results.json").read_text())
    results["flagfile"] = "experiments/flags/demo.flags"
    (folder / "results.json").write_text(json.dumps(results))
    flags_dir = tmp_path / "flags"
    flags_dir.mkdir()
    old = "# python -m experiments.omniglot --flagfile=experiments/flags/demo.flags\n"
    (flags_dir / "demo.flags").write_text(old + "# result: stale\n# the demo\n--ways=5\n")
    reporting.build(["models"], output=tmp_path / "R.md", readme=None, flags_dir=flags_dir)
    assert (flags_dir / "demo.flags").read_text().splitlines() == [
        old.strip(),
        "# result: test 97.12% +- 0.31 (95% CI, 1,000 episodes), 3,500 steps, 1h02m on 1 x "
        "NVIDIA H200: models/demo",
        "# the demo",
        "--ways=5",
    ]


def test_bad_ablation_files_are_refused_with_one_line(tmp_path):
    row = {"name": "x", "flags": "", "steps": 1, "wall_time_s": 1.0, "val_accuracy": 0.5,
           "val_ci95": 0.1}  # fmt: skip
    with pytest.raises(ValueError, match="row 0 .'x'. lacks val_accuracy .or best_valid"):
        reporting.write_ablation(tmp_path / "a.json", "t", [dict(row, val_accuracy=None)])
    with pytest.raises(ValueError, match="val_accuracy=92.3 is not a fraction"):
        reporting.write_ablation(tmp_path / "a.json", "t", [dict(row, val_accuracy=92.3)])
    with pytest.raises(ValueError, match="unknown row field.*accuracy"):
        reporting.write_ablation(tmp_path / "a.json", "t", [dict(row, accuracy=0.5)])
    assert not (tmp_path / "a.json").exists()
    (tmp_path / "b.json").write_text(json.dumps({"name": "b", "rows": [{"name": "y"}]}))
    with pytest.raises(ValueError, match="b.json: row 0 .'y'. lacks steps, wall_time_s"):
        reporting.results_markdown([], ["pretrained"], tmp_path)


def test_report_program_check_fails_on_a_stale_readme(tmp_path):
    (tmp_path / "pre").mkdir()
    readme = tmp_path / "README.md"
    readme.write_text(f"{reporting.README_BEGIN}\nstale\n{reporting.README_END}\n")
    args = [sys.executable, "-m", "experiments.report", str(tmp_path / "pre"), "--check",
            f"--readme={readme}", f"--output={tmp_path / 'R.md'}", "--flags_dir="]  # fmt: skip
    out = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1 and "out of date" in out.stderr and "README.md" in out.stderr
    assert readme.read_text().count("stale") == 1 and not (tmp_path / "R.md").exists()


# A model trained on episodes of several ways on the previous split (previous_cpu's recipe).
MIXED_RECIPE = dict(split="previous", ways=5, max_ways=20, train_ways=(5, 10, 15, 20),
                    conv_channels=32)  # fmt: skip


def _tested_previous(ways, accuracy):
    """An `eval_*.json` record of the previous split's test at `ways`, CI 0.20 points."""
    return {"name": f"w{ways}", "data": "omniglot/previous/test", "ways": ways, "shots": 1,
            "queries_per_class": 10, "episodes": 1000, "seed": train.TEST_SEED,
            "batch": 50, "accuracy": accuracy, "ci95": 0.002}  # fmt: skip


def test_table_1_shows_a_model_trained_on_several_ways_in_every_column_it_was_tested_at(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)

    tested, mixed = _tested_previous, MIXED_RECIPE
    _source(tmp_path / "models", "mix", evals=[tested(10, 0.97), tested(20, 0.95)], **mixed)
    folder = _source(tmp_path / "models", "mix_minus", variant="metanet-",
                     evals=[tested(15, 0.9611)], **mixed)  # fmt: skip
    results = json.loads((folder / "results.json").read_text())  # the paper's last three
    results["model_config"] = {"augment_base": ["conv_2", "conv_3", "out"],
                               "augment_representation": None}  # fmt: skip
    (folder / "results.json").write_text(json.dumps(results))
    _source(tmp_path / "models", "one10", split="previous", ways=10, max_ways=20,
            evals=[tested(20, 0.93)])  # fmt: skip
    text = reporting.results_markdown(
        reporting.find_sources(["models"]), ["models"], ablations_dir=None
    )
    how = "5/10/15/20-way episodes, 32 channels, all layers augmented"
    row = _row(text, "MetaNet", "5", "98.95", how)
    assert "| 97.12 +- 0.31 | 1,000 | `models/mix` | 1,000 | 1h02m | 1 x NVIDIA H200 |" in row
    row = _row(text, "MetaNet", "10", "98.67", how)
    assert "| 97.00 +- 0.20 | 1,000 | `models/mix` |" in row
    assert row.endswith("`python -m experiments.evaluate --workdir=models/mix --ways=10` |")
    assert "| 95.00 +- 0.20 | 1,000 | `models/mix` |" in _row(text, "MetaNet", "20", "97.0", how)
    # Not tested 15-way: that column holds no row of it.
    assert "`models/mix`" not in _row(text, "MetaNet", "15", "97.11", "")
    # MetaNet-, with the augmented layers it names.
    how_minus = "5/10/15/20-way episodes, 32 channels, augmented b: conv_2,conv_3,out; u: all"
    assert "| 96.11 +- 0.20 | 1,000 | `models/mix_minus` |" in _row(
        text, "MetaNet-", "15", "96.68", how_minus
    )
    # A model trained 10-way on one ways: its own test in Table 1, its 20-way test in the
    # trained-N / tested-K table, which holds no model trained on several ways.
    assert "`models/one10`" in _row(text, "MetaNet", "10", "98.67", "10-way, all layers augmented")
    assert "`models/one10`" not in _row(text, "MetaNet", "20", "97.0", how)
    assert "| 93.00 +- 0.20 | 1,000 | `models/one10` |" in _row(text, "10", "20", "96.21")
    n_to_k = text[text.index("## Trained N-way, tested K-way") : text.index("## MNIST")]
    assert "`models/mix" not in n_to_k


def test_the_ordering_table_compares_the_variants_of_one_recipe_with_their_intervals(
    tmp_path, monkeypatch
):
    monkeypatch.chdir(tmp_path)

    tested, mixed = _tested_previous, MIXED_RECIPE
    models = tmp_path / "models"
    _source(models, "mix", evals=[tested(10, 0.97), tested(15, 0.96), tested(20, 0.95)], **mixed)
    _source(models, "mix_minus", variant="metanet-",
            evals=[tested(10, 0.9611), tested(15, 0.9595)], **mixed)  # fmt: skip
    # Fewer steps: still the same recipe.
    _source(models, "mix_plus", variant="metanet+", steps=20000, evals=[tested(20, 0.953)],
            **mixed)  # fmt: skip
    # Another recipe (16 channels): compared with nothing.
    _source(models, "narrow_minus", variant="metanet-", **{**mixed, "conv_channels": 16})
    text = reporting.results_markdown(
        reporting.find_sources(["models"]), ["models"], ablations_dir=None
    )
    section = text[text.index("## Table 1's ablation") : text.index("## Omniglot, standard")]
    # 5-way: every results.json test is 97.12 +- 0.31; each difference is 0 +- 0.44.
    row = _row(section, "5", *["97.12 +- 0.31"] * 3, *["+0.00 +- 0.44 (within CI)"] * 2)
    assert "| MetaNet- = MetaNet = MetaNet+ | MetaNet > MetaNet+ > MetaNet- |" in row
    # Each model with its steps: MetaNet+ trained 20,000 (the others the helper's 1,000).
    assert "`models/mix_minus` (1,000) / `models/mix` (1,000) / `models/mix_plus` (20,000) |" in row
    # 10-way: 97.00 - 96.11 = +0.89, interval 1.96 * sqrt(2) * 0.102 = 0.28.
    row = _row(section, "10", "96.11 +- 0.20", "97.00 +- 0.20", "")
    assert "| +0.89 +- 0.28 (ahead) |  | MetaNet > MetaNet- | MetaNet > MetaNet- |" in row
    # 20-way: MetaNet+ 95.30 beats MetaNet 95.00 by more than 0.28: the paper's order fails.
    row = _row(section, "20", "", "95.00 +- 0.20", "95.30 +- 0.20")
    assert "|  | -0.30 +- 0.28 (behind) | MetaNet+ > MetaNet | MetaNet > MetaNet+ |" in row
    # 15-way: 96.00 - 95.95 = +0.05, inside its 0.28: our order says so with "~".
    row = _row(section, "15", "95.95 +- 0.20", "96.00 +- 0.20", "")
    assert "| +0.05 +- 0.28 (within CI) |  | MetaNet ~ MetaNet- | MetaNet > MetaNet- |" in row
    assert "narrow_minus" not in section
