"""The training run: outputs, exact resume, workdir guard, NaN stop, signals, corruption."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import signal
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import train
from metanet_jax import checkpointing, evaluation
from metanet_jax.config import MetaNetConfig
from tests.experiments.conftest import replace, tiny_spec

# A config.json written by the code before RunSpec nested a MetaNetConfig (the flat flags dict
# of the tiny run, `tests/experiments/conftest.tiny_spec`), with its workdir blanked.
OLD_CONFIG = Path(__file__).parent / "data" / "config_before_nested_runspec.json"


def _params(workdir, step):
    config, _, _ = evaluation.load_checkpoint_with_meta(workdir, "latest")
    with checkpointing.Checkpointer(evaluation.checkpoint_dir(workdir), read_only=True) as ck:
        state, _ = ck.restore(step, evaluation.fresh_state(config))
    return state


def _bitwise_equal(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_a_run_writes_every_output(spec_factory):
    spec = spec_factory()
    results = train.train_and_evaluate(spec)
    workdir = spec.workdir
    assert results["status"] == "completed"
    for name in ("config.json", "metrics.jsonl", "results.json", "results.md",
                 "learning_curve.png", "attention.png"):  # fmt: skip
        assert os.path.exists(os.path.join(workdir, name)), name
    assert os.listdir(os.path.join(workdir, "tensorboard"))
    saved = json.load(open(os.path.join(workdir, "results.json")))
    for key in ("config", "steps", "wall_time_s", "test_accuracy", "test_ci95", "devices",
                "processes", "versions"):  # fmt: skip
        assert key in saved, key
    assert saved["steps"] == 4 and saved["test_episodes"] == 8 and saved["devices"] >= 1
    # Every key of a run's results.json, none added or lost (tools outside read it).
    assert sorted(saved) == ["best_validation_accuracy", "config", "devices", "episodes_per_s",
                             "evaluated_step", "model_config", "platform", "processes", "steps",
                             "test_accuracy", "test_ci95", "test_episodes", "test_time_s",
                             "test_ways", "versions", "wall_time_s"]  # fmt: skip
    records = [json.loads(x) for x in open(os.path.join(workdir, "metrics.jsonl"))]
    keys = set().union(*records)
    for key in ("loss", "accuracy", "validation_accuracy", "grad_norm/base",
                "grad_norm/representation", "grad_norm/example_generator",
                "grad_norm/task_generator", "attention_entropy", "example_fast_weight_norm",
                "task_fast_weight_norm", "episodes_per_s"):  # fmt: skip
        assert key in keys, key
    config, params = evaluation.load_checkpoint(workdir, "best")
    assert config.ways == 3 and set(params) == {
        "base", "representation", "example_generator", "task_generator"
    }  # fmt: skip


def test_stop_and_resume_is_bitwise_identical_to_one_run(spec_factory, caplog):
    one = spec_factory("one", steps=6)
    train.train_and_evaluate(one)
    split = spec_factory("split", steps=3)
    train.train_and_evaluate(split)
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(replace(split, steps=6))
    assert "resumed from step 3" in caplog.text
    a, b = _params(one.workdir, 6), _params(split.workdir, 6)
    assert _bitwise_equal(a.params, b.params)
    assert _bitwise_equal(a.opt_state, b.opt_state)
    assert np.array_equal(jax.random.key_data(a.key), jax.random.key_data(b.key))


def test_changed_model_flags_are_refused_and_steps_may_change(spec_factory):
    spec = spec_factory(steps=2)
    train.train_and_evaluate(spec)
    with pytest.raises(train.WorkdirMismatch, match=r"variant .*metanet-.*ways \(3 -> 4\)"):
        train.train_and_evaluate(replace(spec, ways=4, variant="metanet-"))
    out = train.train_and_evaluate(replace(spec, steps=3, eval_episodes=8, log_every=2))
    assert out["status"] == "completed" and out["steps"] == 3


def test_the_flat_flags_round_trip_through_the_nested_spec():
    spec = tiny_spec("w", max_ways=4, learning_rate=0.002, rotate=False)
    assert spec.model == MetaNetConfig(
        ways=3, queries_per_class=2, conv_channels=3, num_conv_layers=2, hidden_units=5,
        rep_chunks=2, max_ways=4, learning_rate=0.002,
    )  # fmt: skip
    assert (spec.data.rotate, spec.optim.steps, spec.workdir) == (False, 4, "w")
    assert train.RunSpec.from_flags(spec.to_dict()) == spec  # every group: test_schema.py
    # The run's model: the flags' model at the data's image size.
    config = train.model_config(spec, (8, 8, 1))
    assert config == dataclasses.replace(spec.model, image_shape=(8, 8, 1))
    with pytest.raises(TypeError, match="no_such_flag"):
        train.RunSpec.from_flags({"workdir": "w", "no_such_flag": 1})
    with pytest.raises(ValueError, match="learning_rate"):
        tiny_spec("w", learning_rate=0.0)


def test_a_workdir_written_before_the_nested_spec_resumes(spec_factory, caplog):
    """config.json as the flat-spec code wrote it: the same run is accepted, resumes from its
    checkpoint and keeps config.json's flags; a changed model flag is still refused."""
    spec = spec_factory()
    old = json.loads(OLD_CONFIG.read_text())
    old["flags"]["workdir"] = spec.workdir
    os.makedirs(spec.workdir)
    with open(os.path.join(spec.workdir, "config.json"), "w") as f:
        json.dump(old, f)
    saved, now = train.check_workdir(spec)["flags"], spec.to_dict()
    assert saved == {k: now[k] for k in saved}  # the same flags, flat
    # Only fields added since the fixture was written are missing (their defaults are what
    # the run did).
    assert set(now) - set(saved) == {
        "attention_scale", "train_ways", "generator_kernel", "translate"
    }  # fmt: skip
    spec = replace(spec, steps=2)
    assert train.train_and_evaluate(spec)["status"] == "completed"
    with caplog.at_level(logging.INFO):
        out = train.train_and_evaluate(replace(spec, steps=3))
    assert out["status"] == "completed" and "resumed from step 2" in caplog.text
    saved = json.loads(open(os.path.join(spec.workdir, "config.json")).read())
    # config.json keeps its flags, the new steps, and now records the newer fields' values.
    assert saved["flags"] == dict(
        old["flags"], steps=3, attention_scale=1.0, train_ways=[], generator_kernel="auto",
        translate=0,
    )  # fmt: skip
    assert saved["model_config"] == dict(
        old["model_config"], attention_scale=1.0, generator_kernel="auto"
    )
    with pytest.raises(train.WorkdirMismatch, match=r"hidden_units \(5 -> 6\)"):
        train.check_workdir(replace(spec, hidden_units=6))


def _write_old_config(spec):
    """A config.json as written before `bn_statistics` and `eval_ways` existed."""
    flags = spec.to_dict()
    del flags["bn_statistics"], flags["eval_ways"]
    os.makedirs(spec.workdir, exist_ok=True)
    with open(os.path.join(spec.workdir, "config.json"), "w") as f:
        json.dump({"flags": flags}, f)


def test_an_old_workdir_resumes_with_per_pass_or_is_refused(tmp_path):
    mini = tiny_spec(tmp_path / "mini", architecture="mini_imagenet_cnn", num_conv_layers=3)
    _write_old_config(mini)
    with pytest.raises(train.WorkdirMismatch, match=r"bn_statistics \('per_pass' -> 'authors'"):
        train.check_workdir(mini)  # the new default would change the model: refused
    assert train.check_workdir(replace(mini, bn_statistics="per_pass"))
    # Without BatchNorm layers the statistics change nothing: an old Omniglot run resumes.
    omniglot = tiny_spec(tmp_path / "omniglot")
    _write_old_config(omniglot)
    assert train.check_workdir(omniglot)


def _faulty(at_step, fault):
    def factory(config, optimizer, validate=False):
        inner = train.jitted_train_step(config)  # shares the compiled step

        def step(state, support, query):
            state, metrics = inner(state, support, query)
            if int(state.step) == at_step:
                metrics = fault(metrics)
            return state, metrics

        return step

    return factory


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(spec_factory, caplog):
    spec = spec_factory(steps=5)
    nan = lambda m: dict(m, loss=m["loss"] * jnp.nan)
    with caplog.at_level(logging.ERROR):
        out = train.train_and_evaluate(spec, step_factory=_faulty(3, nan))
    assert out == {"status": "nan", "step": 3, "last_good_step": 2}
    assert "non-finite loss (nan) at step 3" in caplog.text
    with checkpointing.Checkpointer(evaluation.checkpoint_dir(spec.workdir)) as ck:
        assert ck.latest_step() == 2
    assert not os.path.exists(os.path.join(spec.workdir, "results.json"))


def test_sigterm_saves_a_checkpoint_and_a_rerun_finishes(spec_factory, caplog):
    spec = spec_factory(steps=5, checkpoint_every=100, eval_every=100)

    def term(metrics):
        os.kill(os.getpid(), signal.SIGTERM)
        return metrics

    with caplog.at_level(logging.INFO):
        out = train.train_and_evaluate(spec, step_factory=_faulty(2, term))
        assert out == {"status": "interrupted", "step": 2, "signal": "SIGTERM"}
        assert "SIGTERM received" in caplog.text
        assert signal.getsignal(signal.SIGTERM) is not None  # handlers restored
        with checkpointing.Checkpointer(evaluation.checkpoint_dir(spec.workdir)) as ck:
            assert ck.steps() == [2]
        out = train.train_and_evaluate(spec)
    assert "resumed from step 2" in caplog.text
    assert out["status"] == "completed"


def test_corrupted_latest_checkpoint_resumes_from_the_previous_one(spec_factory, caplog):
    spec = spec_factory(steps=3, keep_checkpoints=3)
    train.train_and_evaluate(spec)
    latest = evaluation.checkpoint_dir(spec.workdir) / "3"
    for p in (latest / "state").rglob("*"):
        if p.is_file() and p.parent.name == "d":
            p.write_bytes(b"")
    with caplog.at_level(logging.INFO):
        out = train.train_and_evaluate(replace(spec, steps=4))
    assert str(latest) in caplog.text and "falling back" in caplog.text
    assert "resumed from step 2" in caplog.text
    assert out["status"] == "completed"


def test_mixed_training_ways_draw_each_steps_episode_size_and_resume_exactly(spec_factory):
    """`train_ways`: each step's episodes have the ways `step_ways` names (support and
    queries sized and labelled for it), both sizes occur, and a split run equals one run."""
    seen = []

    def recording_factory(config, optimizer, validate=False):
        step = train.make_train_step(config, optimizer, validate=validate)

        def run(state, support, query):
            seen.append((config.ways, support.y.shape, query.y.shape, int(support.y.max())))
            return step(state, support, query)

        return run

    spec = spec_factory("mixed", max_ways=4, train_ways="2,4", steps=8)
    assert spec.train_ways == (2, 4)
    train.train_and_evaluate(spec, step_factory=recording_factory)
    ways = [spec.step_ways(t) for t in range(8)]
    assert set(ways) == {2, 4}  # both drawn in 8 steps with this seed
    batch, q = spec.optim.meta_batch, spec.model.queries_per_class
    assert seen == [(w, (batch, w), (batch, w * q), w - 1) for w in ways]

    split = spec_factory("split", max_ways=4, train_ways="2,4", steps=5)
    train.train_and_evaluate(split)
    train.train_and_evaluate(replace(split, steps=8))
    assert _bitwise_equal(_params(spec.workdir, 8).params, _params(split.workdir, 8).params)
    with pytest.raises(train.WorkdirMismatch, match=r"train_ways"):
        train.train_and_evaluate(replace(spec, train_ways=(2, 3)))


class _FirstEpisodes(Exception):
    """Raised by `_first_episodes`' step: the run stops at its first step."""


def _first_episodes(spec):
    """The support images the run's first train step is given (the run stops there)."""
    seen = []

    def factory(config, optimizer, validate=False):
        def run(state, support, query):
            seen.append(np.asarray(support.x))
            raise _FirstEpisodes

        return run

    with pytest.raises(_FirstEpisodes):
        train.train_and_evaluate(spec, step_factory=factory)
    return seen[0]


def test_translate_moves_each_training_image_by_at_most_its_pixels(spec_factory):
    still = _first_episodes(spec_factory("still"))
    moved = _first_episodes(spec_factory("moved", translate=1))
    assert still.shape == moved.shape and not np.array_equal(still, moved)
    # The same drawings (the shifts have their own key), each moved by one of the 9 shifts.
    h, w = still.shape[-3:-1]
    padded = np.pad(still, [(0, 0)] * (still.ndim - 3) + [(1, 1), (1, 1), (0, 0)])
    windows = [padded[..., 1 - dy : 1 - dy + h, 1 - dx : 1 - dx + w, :]
               for dy in (-1, 0, 1) for dx in (-1, 0, 1)]  # fmt: skip
    match = np.stack([np.all(win == moved, axis=(-3, -2, -1)) for win in windows])
    assert match.any(axis=0).all()  # every image is a shift of its unmoved self
    assert (~match[4]).any()  # and some are not the unmoved image (shift (0, 0))


@pytest.mark.parametrize(
    "train_ways, match",
    [("2,5", r"\[5\] outside 2\.\.4"), ("3,3", "twice"), ("1", r"\[1\] outside")],
)
def test_train_ways_outside_the_output_units_are_refused(train_ways, match):
    with pytest.raises(ValueError, match=match):
        tiny_spec("w", max_ways=4, train_ways=train_ways)
