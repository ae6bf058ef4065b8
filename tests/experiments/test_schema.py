"""experiments.schema: the run's flags grouped by concern (data, model, optim, schedule), and
the flat flag map of the command line and config.json that they convert from and to."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from experiments import common, protocol, schema

# Each group's flags, written out here (not read from the code under test), in field order.
DATA_FLAGS = [
    "dataset", "split", "validation_classes", "validation_alphabets", "split_seed", "datasets",
    "mini_imagenet_dir", "synthetic_size", "rotate", "rotations_as_classes", "translate",
]  # fmt: skip
MODEL_FLAGS = [
    "ways", "shots", "queries_per_class", "max_ways", "learning_rate", "clip_norm",
    "lr_schedule", "warmup_steps", "schedule_steps", "generator_init", "network_init",
    "label_units", "attention_scale", "variant", "base_input", "architecture", "conv_channels",
    "num_conv_layers", "hidden_units", "rep_chunks", "second_order", "rep_loss_in_objective",
    "task_batching", "query_path", "generator_kernel", "compute_dtype", "bn_statistics",
]  # fmt: skip
OPTIM_FLAGS = ["meta_batch", "steps", "seed"]
SCHEDULE_FLAGS = [
    "eval_every", "eval_episodes", "test_episodes", "mnist_test_episodes", "eval_batch",
    "checkpoint_every", "keep_checkpoints", "log_every",
]  # fmt: skip
EPISODE_FLAGS = ["eval_queries_per_class", "eval_ways", "train_ways"]  # on RunSpec itself

# Every flag set away from its default, flat as config.json holds it.
FLAT = {
    "workdir": "runs/x",
    "dataset": "synthetic", "split": "small1", "validation_classes": 50,
    "validation_alphabets": 3, "split_seed": 7, "datasets": "/data/offline",
    "mini_imagenet_dir": "/data/mini", "synthetic_size": 12, "rotate": False,
    "rotations_as_classes": True, "translate": 2,
    "ways": 4, "shots": 2, "queries_per_class": 3, "max_ways": 6, "learning_rate": 0.002,
    "clip_norm": 5.0, "lr_schedule": "cosine", "warmup_steps": 10, "schedule_steps": 100,
    "generator_init": "authors", "network_init": "authors", "label_units": "any",
    "attention_scale": 2.0, "variant": "metanet+", "base_input": "r", "architecture": "mlp",
    "conv_channels": 8, "num_conv_layers": 3, "hidden_units": 32, "rep_chunks": 2,
    "second_order": True, "rep_loss_in_objective": True, "task_batching": "loop",
    "query_path": "stacked", "generator_kernel": "xla", "compute_dtype": "float64",
    "bn_statistics": "per_pass",
    "eval_queries_per_class": 5, "eval_ways": 5, "train_ways": (4, 6),
    "meta_batch": 8, "steps": 123, "seed": 9,
    "eval_every": 11, "eval_episodes": 12, "test_episodes": 13, "mnist_test_episodes": 14,
    "eval_batch": 15, "checkpoint_every": 16, "keep_checkpoints": 4, "log_every": 17,
}  # fmt: skip

# The defaults of the flags outside the model (the model's are MetaNetConfig's).
RUN_DEFAULTS = {
    "dataset": "omniglot", "split": "standard", "validation_classes": 100,
    "validation_alphabets": 0, "split_seed": 0, "datasets": None, "mini_imagenet_dir": None,
    "synthetic_size": 28, "rotate": True, "rotations_as_classes": False, "translate": 0,
    "eval_queries_per_class": 10, "eval_ways": None, "train_ways": (),
    "meta_batch": 1, "steps": 1000, "seed": 0,
    "eval_every": 500, "eval_episodes": 200, "test_episodes": 1000, "mnist_test_episodes": 0,
    "eval_batch": 50, "checkpoint_every": 500, "keep_checkpoints": 3, "log_every": 50,
}  # fmt: skip

OLD_CONFIG = Path(__file__).parent / "data" / "config_before_nested_runspec.json"


def _names(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def test_each_group_holds_exactly_the_flags_of_its_concern():
    assert _names(schema.RunSpec) == [
        "workdir", "data", "model", *EPISODE_FLAGS, "optim", "schedule",
    ]  # fmt: skip
    assert _names(schema.DataSpec) == DATA_FLAGS
    assert _names(schema.OptimSpec) == OPTIM_FLAGS
    assert _names(schema.ScheduleSpec) == SCHEDULE_FLAGS
    assert list(schema.MODEL_FLAGS) == MODEL_FLAGS
    every = ["workdir", *DATA_FLAGS, *MODEL_FLAGS, *EPISODE_FLAGS, *OPTIM_FLAGS, *SCHEDULE_FLAGS]
    assert schema.RunSpec.flag_names() == every
    assert sorted(every) == sorted(FLAT)  # the map below sets every flag
    # Where each flat flag lives in the nested spec.
    table = schema.RunSpec.flag_table()
    for group, names in [("data", DATA_FLAGS), ("model", MODEL_FLAGS), ("optim", OPTIM_FLAGS),
                         ("schedule", SCHEDULE_FLAGS)]:  # fmt: skip
        assert all(table[n][0] == (group, n) for n in names), group
    assert all(table[n][0] == (n,) for n in ["workdir", *EPISODE_FLAGS])


def test_the_flat_map_round_trips_through_the_groups():
    spec = schema.RunSpec.from_flags(FLAT)
    assert spec.to_dict() == FLAT
    assert schema.RunSpec.from_flags(spec.to_dict()) == spec
    assert spec.data == schema.DataSpec(
        dataset="synthetic", split="small1", validation_classes=50, validation_alphabets=3,
        split_seed=7, datasets="/data/offline", mini_imagenet_dir="/data/mini",
        synthetic_size=12, rotate=False, rotations_as_classes=True, translate=2,
    )  # fmt: skip
    assert spec.optim == schema.OptimSpec(meta_batch=8, steps=123, seed=9)
    assert spec.schedule == schema.ScheduleSpec(
        eval_every=11, eval_episodes=12, test_episodes=13, mnist_test_episodes=14,
        eval_batch=15, checkpoint_every=16, keep_checkpoints=4, log_every=17,
    )  # fmt: skip
    assert (spec.model.ways, spec.model.generator_kernel, spec.model.compute_dtype) == (
        4, "xla", "float64",
    )  # fmt: skip
    assert (spec.workdir, spec.eval_ways, spec.train_ways) == ("runs/x", 5, (4, 6))
    # A flag left out keeps its default, in whichever group.
    defaults = schema.RunSpec.from_flags({"workdir": "w"}).to_dict()
    assert {k: defaults[k] for k in RUN_DEFAULTS} == RUN_DEFAULTS


def test_replace_takes_flat_flags_of_any_group():
    spec = schema.RunSpec.from_flags(FLAT)
    again = spec.replace(steps=5, split="previous", log_every=3, ways=5, eval_ways=None)
    assert (again.optim.steps, again.data.split, again.schedule.log_every) == (5, "previous", 3)
    assert (again.model.ways, again.eval_ways) == (5, None)
    assert again.to_dict() == dict(FLAT, steps=5, split="previous", log_every=3, ways=5,
                                   eval_ways=None)  # fmt: skip


@pytest.mark.parametrize("name", ["no_such_flag", "optim", "data", "model", "schedule"])
def test_an_unknown_flat_key_is_refused_naming_it(name):
    """A group's name is no flag either: the flat map holds flags only."""
    with pytest.raises(TypeError, match=f"RunSpec has no flag '{name}'"):
        schema.RunSpec.from_flags({"workdir": "w", name: 1})
    with pytest.raises(TypeError, match=name):
        schema.RunSpec.from_flags(FLAT).replace(**{name: 1})


def test_a_legacy_config_without_the_newer_flags_still_loads():
    """config.json of the flat spec, before attention_scale, generator_kernel, train_ways,
    translate (and a flags map before validation_alphabets): the missing flags take what the run did
    then (`LEGACY_RUN_VALUES`, else their defaults), the saved ones their groups."""
    old = json.loads(OLD_CONFIG.read_text())["flags"]
    spec = protocol.run_spec(old)
    assert (spec.data.dataset, spec.data.synthetic_size, spec.data.rotate) == ("synthetic", 8,
                                                                               True)  # fmt: skip
    assert spec.optim == schema.OptimSpec(meta_batch=2, steps=4, seed=0)
    assert spec.schedule == schema.ScheduleSpec(
        eval_every=2, eval_episodes=4, test_episodes=8, mnist_test_episodes=0, eval_batch=4,
        checkpoint_every=1, keep_checkpoints=2, log_every=1,
    )  # fmt: skip
    assert spec.to_dict() == dict(
        old, attention_scale=1.0, generator_kernel="auto", train_ways=(), translate=0
    )
    older = {k: v for k, v in old.items() if k != "validation_alphabets"}
    assert protocol.run_spec(older).data.validation_alphabets == 0


def test_mutable_fields_are_flat_flag_names():
    assert schema.MUTABLE_FIELDS == {
        "steps", "workdir", "datasets", "mini_imagenet_dir", "eval_every", "eval_episodes",
        "test_episodes", "mnist_test_episodes", "eval_batch", "checkpoint_every",
        "keep_checkpoints", "log_every", "generator_kernel",
    }  # fmt: skip
    assert schema.MUTABLE_FIELDS <= set(schema.RunSpec.flag_names())
    assert set(SCHEDULE_FLAGS) <= schema.MUTABLE_FIELDS  # the schedule never changes the model


def test_the_flags_keep_their_bounds_and_help_wherever_they_are_nested():
    table = schema.RunSpec.flag_table()
    assert table["steps"][1:] == (
        common.Flag("int", "Total updates to reach (resume included).", lo=1, hi=10**8),
        1000,
    )
    assert table["rotate"][1:] == (
        common.Flag("bool", "Rotate each training class by k*90 degrees."),
        True,
    )
    assert table["keep_checkpoints"][1:] == (
        common.Flag("int", "Latest checkpoints kept (the best one is kept as well).", lo=1,
                    hi=1000), 3,
    )  # fmt: skip
    assert table["workdir"][2] is dataclasses.MISSING  # required


def test_the_cross_flag_checks_read_the_groups():
    with pytest.raises(ValueError, match="--validation_alphabets needs an Omniglot split"):
        schema.RunSpec.from_flags({"workdir": "w", "split": "previous",
                                   "validation_alphabets": 2})  # fmt: skip
    with pytest.raises(ValueError, match="--dataset=mini_imagenet needs"):
        schema.RunSpec.from_flags({"workdir": "w", "dataset": "mini_imagenet"})
    spec = schema.RunSpec.from_flags(FLAT)
    test = spec.eval_protocol("test")
    assert (test.ways, test.shots, test.queries_per_class, test.episodes, test.batch) == (
        5, 2, 5, 13, 15,
    )  # fmt: skip
    assert (spec.eval_protocol("validation").episodes, spec.mnist_protocol().episodes) == (12, 14)
