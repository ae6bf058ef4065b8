"""Checkpointing: round trip (typed keys), preservation policy, atomicity, corruption, no pickle."""

from __future__ import annotations

import pickle

import jax
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax import checkpointing
from tests.conftest import tiny_config


def _state(seed=0):
    config = tiny_config()
    opt = mn.make_optimizer(config)
    return mn.init_train_state(mn.init(jax.random.key(seed), config), opt, jax.random.key(seed + 7))


def _advance(state, n=1):
    return state._replace(step=state.step + n)


def _equal(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def test_round_trip_keeps_params_optimizer_step_and_typed_key(tmp_path):
    state = _advance(_state(), 3)
    with checkpointing.Checkpointer(tmp_path / "ck") as ck:
        ck.save(state, {"note": "x"})
        restored, meta = ck.restore(3, _state(seed=1))
    assert meta["note"] == "x" and meta["step"] == 3
    assert int(restored.step) == 3
    assert _equal(restored.params, state.params)
    assert _equal(restored.opt_state, state.opt_state)
    assert type(restored.opt_state) is type(state.opt_state)
    assert jax.dtypes.issubdtype(restored.key.dtype, jax.dtypes.prng_key)
    assert np.array_equal(jax.random.key_data(restored.key), jax.random.key_data(state.key))


def test_keeps_latest_n_and_the_best_by_validation_accuracy(tmp_path):
    state = _state()
    accuracies = {1: 0.5, 2: 0.9, 3: None, 4: 0.4, 5: None}
    with checkpointing.Checkpointer(tmp_path / "ck", keep=2) as ck:
        for acc in accuracies.values():
            state = _advance(state)
            ck.save(state, {}, validation_accuracy=acc)
        assert ck.steps() == [2, 4, 5]
        assert ck.best_step() == 2
        assert ck.latest_step() == 5


def test_a_half_written_checkpoint_is_never_listed(tmp_path):
    state = _advance(_state(), 2)
    directory = tmp_path / "ck"
    with checkpointing.Checkpointer(directory) as ck:
        ck.save(state, {})
    # What a process killed during a save leaves behind: orbax's temporary folder.
    (directory / "3.orbax-checkpoint-tmp-1234").mkdir()
    (directory / "3.orbax-checkpoint-tmp-1234" / "state").mkdir()
    with checkpointing.Checkpointer(directory) as ck:
        assert ck.steps() == [2]
        restored, _ = ck.restore_latest(_state())
    assert int(restored.step) == 2


def _corrupt(step_dir):
    """Truncates every array file of a checkpoint to zero bytes."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    for p in files:
        p.write_bytes(b"")


def test_corrupted_latest_falls_back_to_the_previous_with_a_message_naming_it(tmp_path):
    state = _state()
    directory = tmp_path / "ck"
    with checkpointing.Checkpointer(directory, keep=3) as ck:
        for _ in range(2):
            state = _advance(state)
            ck.save(state, {})
    _corrupt(directory / "2")
    messages = []
    with checkpointing.Checkpointer(directory) as ck:
        restored, meta = ck.restore_latest(_state(), warn=messages.append)
    assert int(restored.step) == 1 and meta["step"] == 1
    assert len(messages) == 1
    assert str(directory / "2") in messages[0]
    assert "is corrupt" in messages[0] and "step 1" in messages[0]
    assert "set aside as 2.corrupt-unreadable" in messages[0]
    assert (directory / "2.corrupt-unreadable").is_dir()  # renamed, not deleted


def test_no_readable_checkpoint_is_an_error_not_a_fresh_start(tmp_path):
    directory = tmp_path / "ck"
    with checkpointing.Checkpointer(directory) as ck:
        ck.save(_advance(_state()), {})
    (directory / "1" / "meta" / "metadata").write_text("{trunc")
    _corrupt(directory / "1")
    with checkpointing.Checkpointer(directory) as ck:
        with pytest.raises(checkpointing.CheckpointError, match="refusing to start again"):
            ck.restore_latest(_state(), warn=lambda m: None)


def test_empty_folder_restores_nothing(tmp_path):
    with checkpointing.Checkpointer(tmp_path / "ck") as ck:
        assert ck.restore_latest(_state()) is None


def test_restoring_never_unpickles(tmp_path, monkeypatch):
    state = _advance(_state())
    with checkpointing.Checkpointer(tmp_path / "ck") as ck:
        ck.save(state, {"a": 1})

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while restoring a checkpoint")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    with checkpointing.Checkpointer(tmp_path / "ck", read_only=True) as ck:
        restored, _ = ck.restore(1, _state())
    assert _equal(restored.params, state.params)


def test_config_json_round_trip():
    config = tiny_config(variant="metanet+", max_ways=7)
    again = checkpointing.config_from_dict(checkpointing.config_to_dict(config))
    assert again == config
    with pytest.raises(ValueError, match="unknown"):
        checkpointing.config_from_dict({"nonsense": 1})


def test_saved_config_without_later_fields_keeps_its_old_behaviour():
    """A configuration saved before generator_init, network_init, the schedule and label_units
    existed loads with the values that reproduce what it did then."""
    from metanet_jax import checkpointing
    from metanet_jax.config import MetaNetConfig

    saved = checkpointing.config_to_dict(MetaNetConfig(ways=5))
    for name in ("generator_init", "network_init", "lr_schedule", "warmup_steps",
                 "schedule_steps", "label_units"):  # fmt: skip
        del saved[name]
    config = checkpointing.config_from_dict(saved)
    assert (config.generator_init, config.network_init) == ("small", "he")
    assert (config.lr_schedule, config.warmup_steps, config.label_units) == ("constant", 0, "first")
