"""The authors' Mini-ImageNet protocol: its flagfile, --eval_ways (train N-way, test K-way) and
the split CSV checksums a run records."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from experiments import train
from metanet_jax import evaluation
from tests.data.test_readers import _mini_folder
from tests.experiments.conftest import replace

ROOT = Path(__file__).resolve().parents[2]


def test_the_authors_flagfile_trains_10_way_and_tests_5_way(tmp_path):
    script = textwrap.dedent(
        f"""
        import json, sys
        from absl import flags
        from experiments import omniglot, train
        from metanet_jax import evaluation
        FLAGS = flags.FLAGS
        for name in ("mini_imagenet_authors", "mini_imagenet_5way1shot"):
            FLAGS.unparse_flags()
            FLAGS(["x", f"--flagfile=experiments/flags/{{name}}.flags",
                   "--mini_imagenet_dir={tmp_path}", "--workdir={tmp_path}/w"])
            spec = omniglot.spec_from_flags()
            config = train.model_config(spec, (84, 84, 3))
            test = evaluation.eval_config(config, spec.test_ways(), spec.model.shots, 15)
            print(json.dumps(dict(name=name, spec=spec.to_dict(), units=config.output_units,
                                  test_ways=test.ways, bn=config.bn_statistics)))
        FLAGS.unparse_flags()
        FLAGS(["x", "--workdir={tmp_path}/w", "--ways=5", "--eval_ways=6"])
        try:
            omniglot.spec_from_flags()
        except ValueError as e:
            print("REFUSED", e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    runs = {r["name"]: r for r in map(json.loads, lines[:2])}
    authors = runs["mini_imagenet_authors"]
    spec = authors["spec"]
    assert (spec["dataset"], spec["architecture"]) == ("mini_imagenet", "mini_imagenet_cnn")
    assert (spec["ways"], spec["eval_ways"], spec["shots"], spec["max_ways"]) == (10, 5, 1, None)
    assert (spec["queries_per_class"], spec["eval_queries_per_class"]) == (15, 15)
    assert (spec["rep_chunks"], spec["rotate"], spec["meta_batch"]) == (10, False, 1)
    assert (authors["units"], authors["test_ways"], authors["bn"]) == (10, 5, "authors")
    five = runs["mini_imagenet_5way1shot"]
    assert (five["units"], five["test_ways"], five["bn"]) == (5, 5, "authors")
    assert "REFUSED" in lines[2] and "--eval_ways=6 must be unset or <= --max_ways" in lines[2]


def test_eval_ways_validates_and_tests_on_that_many_ways(spec_factory):
    with pytest.raises(ValueError, match="--eval_ways=4 must be unset or <= --max_ways .* 3 out"):
        train.train_and_evaluate(spec_factory("too_many", eval_ways=4))
    assert not Path(spec_factory("too_many").workdir).exists()

    spec = spec_factory(ways=4, eval_ways=3, steps=2, eval_every=2, checkpoint_every=2)
    results = train.train_and_evaluate(spec)
    assert results["status"] == "completed" and results["test_ways"] == 3
    # The test number is 3-way accuracy on the fixed test episodes, recomputed here.
    config, params = evaluation.load_checkpoint(spec.workdir, "best")
    assert (config.ways, config.output_units) == (4, 4)
    schedule = spec.schedule
    again = evaluation.evaluate_classes(
        params, config, train.load_splits(spec)["test"], ways=3, shots=1,
        queries_per_class=spec.eval_queries_per_class, episodes=schedule.test_episodes,
        seed=train.TEST_SEED, batch_size=min(schedule.eval_batch, schedule.test_episodes),
    )  # fmt: skip
    assert again.mean == results["test_accuracy"]
    assert again.accuracies.shape == (schedule.test_episodes,)


def test_a_run_records_the_split_csv_checksums_and_refuses_other_files(tmp_path):
    folder = tmp_path / "mini"
    _mini_folder(folder)
    spec = train.RunSpec.from_flags(dict(
        workdir=str(tmp_path / "run"), dataset="mini_imagenet", mini_imagenet_dir=str(folder),
        architecture="mini_imagenet_cnn",
    ))  # fmt: skip
    record = train.data_record(spec)
    want = {s: hashlib.sha256((folder / f"{s}.csv").read_bytes()).hexdigest()
            for s in ("train", "val", "test")}  # fmt: skip
    assert record == {"mini_imagenet_csv_sha256": want}
    config = train.model_config(spec, (84, 84, 3))
    train.write_workdir_config(spec, config, record)
    saved = train.check_workdir(spec)
    assert saved["data"] == record
    train.check_data_record(spec, saved, record)  # the same files: resumes
    # Another split file under the same folder name: refused, naming the file.
    (folder / "val.csv").write_text((folder / "val.csv").read_text().replace("n00000002", "n9"))
    with pytest.raises(train.WorkdirMismatch, match=r"mini_imagenet_csv_sha256/val "):
        train.check_data_record(spec, saved, train.data_record(spec))
    # Other data sets record nothing; a workdir written before the record existed resumes.
    assert train.data_record(replace(spec, dataset="synthetic")) is None
    train.check_data_record(spec, {"flags": {}}, train.data_record(spec))
