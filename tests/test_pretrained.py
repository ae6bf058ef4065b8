"""metanet_jax.pretrained: the no-pickle params file, loading and checking a pretrained folder,
the models committed in pretrained/ (a run exported: tests/experiments/test_exporting.py)."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax import checkpointing, pretrained
from tests.conftest import tiny_config

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def folder(tmp_path):
    """A pretrained folder written by hand: params.npz of a fresh tiny model, config.json."""
    config = tiny_config(max_ways=4)
    params = mn.init(jax.random.key(0), config)
    path = tmp_path / "tiny"
    path.mkdir()
    pretrained.save_params(path / pretrained.PARAMS_FILE, params)
    record = {"flags": {"ways": 3}, "model_config": checkpointing.config_to_dict(config)}
    (path / pretrained.CONFIG_FILE).write_text(json.dumps(record))
    return path


def test_load_pretrained_gives_back_the_saved_config_and_params(folder):
    config, params = mn.load_pretrained(str(folder))
    assert config == tiny_config(max_ways=4)
    want = mn.init(jax.random.key(0), config)
    assert jax.tree.structure(params) == jax.tree.structure(want)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(want), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    _, _, meta = pretrained.load_model(folder)
    assert meta["flags"] == {"ways": 3} and meta["results"] == {} and meta["step"] is None


def test_load_pretrained_errors(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="no pretrained model 'no-such-model'"):
        mn.load_pretrained("no-such-model")
    # A params file that does not fit its config: one line naming the leaf.
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text((folder / "config.json").read_text())
    with np.load(folder / "params.npz", allow_pickle=False) as f:
        arrays = {k: f[k] for k in f.files}
    dropped = sorted(arrays)[0]
    del arrays[dropped]
    arrays["base/out/kernel"] = np.zeros((1, 1), np.float32)
    np.savez(bad / "params.npz", **arrays)
    with pytest.raises(ValueError, match=f"missing {dropped}.*shape/dtype of base/out/kernel"):
        mn.load_pretrained(bad)


def test_flatten_refuses_ambiguous_keys():
    assert pretrained.flatten_params({"a": {"b": np.ones(2)}}).keys() == {"a/b"}
    with pytest.raises(ValueError, match="cannot be saved"):
        pretrained.flatten_params({"a/b": np.ones(2)})


def test_committed_pretrained_models_are_small_pickle_free_and_complete():
    models = ROOT / "pretrained"
    assert pretrained.folder_size(models) <= pretrained.MAX_TOTAL_BYTES
    for model in sorted(p for p in models.iterdir() if p.is_dir()):
        assert pretrained.is_pretrained(model), model
        assert pretrained.folder_size(model) <= pretrained.MAX_MODEL_BYTES, model
        for npz in model.glob("*.npz"):
            with np.load(npz, allow_pickle=False) as f:
                for k in f.files:
                    assert f[k].dtype != object, (npz, k)
        results = json.loads((model / "results.json").read_text())
        for key in ("test_accuracy", "test_ci95", "test_episodes", "steps", "wall_time_s",
                    "test_protocol"):  # fmt: skip
            assert results.get(key) is not None, (model, key)
        assert results["test_platform"] == "cpu", model
        for key in ("ways", "shots", "split"):
            assert key in results["config"], (model, key)
        mn.load_pretrained(model.name)  # params fit the config


def test_load_reads_a_run_folder_or_a_pretrained_folder_or_name(folder, tmp_path):
    """`metanet_jax.load(path, which)`: one entry for the checkpoints of a run's folder and
    for pretrained folders."""
    config = tiny_config(max_ways=4)
    saved = {}
    with checkpointing.Checkpointer(checkpointing.checkpoint_dir(tmp_path / "run")) as ckpt:
        for step, (seed, accuracy) in enumerate([(1, 0.7), (2, 0.5)], start=1):
            state = checkpointing.fresh_state(config, seed=seed)
            state = state._replace(step=np.asarray(step, state.step.dtype))
            meta = {"model_config": checkpointing.config_to_dict(config), "flags": {"s": seed}}
            ckpt.save(state, meta, validation_accuracy=accuracy)
            saved[step] = state.params
    for which, step in (("best", 1), ("latest", 2)):
        got_config, params, meta = mn.load(tmp_path / "run", which)
        assert got_config == config and meta["step"] == step and meta["flags"] == {"s": step}
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(saved[step]), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    got_config, params, meta = mn.load(folder)
    assert got_config == config and meta["flags"] == {"ways": 3}
    if (ROOT / "pretrained" / "demo").is_dir():
        demo = json.loads((ROOT / "pretrained" / "demo" / "config.json").read_text())
        assert mn.load("demo")[2]["flags"] == demo["flags"]
    with pytest.raises(FileNotFoundError, match="no pretrained model 'nothing-here'"):
        mn.load("nothing-here")
    with pytest.raises(FileNotFoundError, match="no checkpoints in"):
        mn.load(tmp_path)  # a folder that is neither
