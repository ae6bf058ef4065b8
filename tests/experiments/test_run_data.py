"""The run's data: the image shape known before loading, and the compilation it lets start."""

from __future__ import annotations

import pytest

from experiments import run_data, train
from tests.experiments.conftest import tiny_spec


@pytest.mark.parametrize("size", [8, 12])
def test_the_image_shape_is_the_loaded_images(tmp_path, size):
    spec = tiny_spec(tmp_path / "run", synthetic_size=size)
    assert run_data.image_shape(spec) == run_data.load_splits(spec)["train"].shape[2:]
    assert run_data.image_shape(spec) == (size, size, 1)


def test_the_steps_compile_while_the_data_loads(tmp_path, monkeypatch):
    """The compilation ahead of time is under way (its programs submitted) when the data
    starts loading, and the run then completes as before."""
    seen = {}
    load = run_data.load_data
    compile_ahead = train._compile_ahead

    def recording_compile(spec, step_fn):
        compilations = compile_ahead(spec, step_fn)
        seen["submitted"] = sorted(k for k in compilations._futures if k != "eval")
        return compilations

    def recording_load(spec):
        seen["loaded_after_submission"] = "submitted" in seen
        return load(spec)

    monkeypatch.setattr(train, "_compile_ahead", recording_compile)
    monkeypatch.setattr(run_data, "load_data", recording_load)
    spec = tiny_spec(tmp_path / "run", max_ways=3, train_ways="2,3")
    assert train.train_and_evaluate(spec)["status"] == "completed"
    assert seen == {"submitted": [("train", 2), ("train", 3)], "loaded_after_submission": True}


def test_data_of_another_shape_than_expected_stops_the_run(tmp_path, monkeypatch):
    monkeypatch.setattr(run_data, "image_shape", lambda spec: (9, 9, 1))
    with pytest.raises(ValueError, match=r"images are \(8, 8, 1\), not \(9, 9, 1\)"):
        train.train_and_evaluate(tiny_spec(tmp_path / "run"))
