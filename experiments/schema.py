"""The training run's schema: `RunSpec`, every flag of `experiments/omniglot.py` in one
frozen object, grouped by concern: `DataSpec`, the model as a nested `MetaNetConfig`
(`MODEL_FLAGS`), `OptimSpec`, `ScheduleSpec`; and its checks.

`RunSpec.from_flags` / `RunSpec.to_dict` convert from and to the flat flags that config.json
and results.json hold (`common.Spec`: one flat name per flag, whichever group holds it);
`MUTABLE_FIELDS` (flat names) may change when a run resumes;
`LEGACY_RUN_VALUES` is what a config.json written before a field existed meant. The checks
that need the data's sizes are `check_pools`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

import numpy as np

from experiments import common
from metanet_jax.config import LEGACY_VALUES, MetaNetConfig
from metanet_jax.data import SPLIT_SCHEMES

# Seeds of the fixed evaluation episode sets: independent of the training seed, so runs with
# different seeds are compared on the same episodes.
VALIDATION_SEED = 1
TEST_SEED = 2
MNIST_SEED = 3

DATASETS = ("omniglot", "mini_imagenet", "synthetic")

# RunSpec fields added after workdirs were first written, with the value a config.json
# without them meant (the model's fields as in `config.LEGACY_VALUES`).
LEGACY_RUN_VALUES = {
    **LEGACY_VALUES,
    "validation_alphabets": 0,
    "translate": 0,
}


# The `MetaNetConfig` fields the programs set by flags, in the order of the training
# program's flags: their help and bounds; their kinds and choices are the fields' types and
# their defaults the spec's `model`. The other fields keep their defaults and `image_shape`
# comes from the data.
MODEL_FLAGS = common.config_flags(
    MetaNetConfig,
    {
        "ways": ("Classes per episode (N-way).", 2, 1000),
        "shots": ("Support examples per class (K-shot).", 1, 100),
        "queries_per_class": ("Training query examples per class.", 1, 100),
        "max_ways": ("Output units of b (>= ways), to test on more ways than trained.", 2, 1000),
        "learning_rate": ("Adam learning rate.", 0.0, 1.0),
        "clip_norm": ("Global-norm gradient clipping.", 0.0, 1e6),
        "lr_schedule": "Learning rate: constant (the authors') or cosine decay to 0 at "
        "--schedule_steps, both after --warmup_steps of linear warm-up.",
        "warmup_steps": ("Linear learning-rate warm-up.", 0, 10**8),
        "schedule_steps": (
            "Length of the cosine schedule (recorded; independent of --steps, so a finished "
            "run can be continued without changing its past schedule).",
            0,
            10**8,
        ),
        "generator_init": "Initialisation of m and d: authors (Chainer v1 defaults, as the "
        "authors' code) or small (fast weights start as a small perturbation).",
        "network_init": "Initialisation of b and u: authors (N(0, 1/fan_in), Chainer v1) or he.",
        "label_units": "Training labels: first (0..ways-1, the first --ways output units) or "
        "any (a random --ways of the --max_ways units per episode: all are trained).",
        "attention_scale": (
            "s in the memory read softmax(s * cosine): 1 is the paper's (eq. 4) and the "
            "authors'; larger values sharpen the read (not in the paper).",
            0.0,
            1e3,
        ),
        "variant": "MetaNet variant.",
        "base_input": "Input of the base learner: x (image) or r (representation).",
        "architecture": "Networks b and u.",
        "conv_channels": ("Conv channels (unset: architecture default).", 1, 1024),
        "num_conv_layers": ("Conv blocks (unset: architecture default).", 1, 8),
        "hidden_units": ("FC width (unset: architecture default).", 1, 4096),
        "rep_chunks": ("T: support chunks for d.", 1, 100),
        "second_order": "Differentiate through meta information.",
        "rep_loss_in_objective": "Add the representation loss to the training objective.",
        "task_batching": "Tasks of a meta-batch: auto (loop on CPU, vmap on accelerators), loop "
        "(a host loop over one per-task program) or vmap.",
        "query_path": "How queries read their own fast weights: auto (patches on CPU, stacked "
        "on accelerators), stacked or patches (README).",
        "generator_kernel": "Code computing m and d: auto (fused on CPU in float32 when built, "
        "else xla), xla or fused (C++ kernels: make kernels). May change on resume.",
        "compute_dtype": "Activation dtype.",
        "bn_statistics": "BatchNorm statistics (Mini-ImageNet network): authors (the whole "
        "support set for the meta-gradients, support set and queries apart for the keys) or "
        "per_pass (the examples of each pass: what runs made before this flag used); see "
        "MetaNetConfig.bn_statistics.",
    },
)


@dataclasses.dataclass(frozen=True)
class DataSpec(common.Spec):
    """The data of a run: which data set and classes, where its files are, and how training
    classes are augmented (`RunSpec.data`)."""

    dataset: str = common.enum_field("omniglot", DATASETS, "Data set.")
    split: str = common.enum_field(
        "standard", SPLIT_SCHEMES, "Omniglot class split scheme (docs/DATA.md)."
    )
    validation_classes: int = common.int_field(
        100, 1, 500, "Omniglot background characters held out for validation."
    )
    validation_alphabets: int = common.int_field(
        0, 0, 29, "Hold out this many whole background alphabets for validation instead of "
        "--validation_classes characters (standard and small splits; 0: off).",
    )  # fmt: skip
    split_seed: int = common.int_field(0, 0, common.MAX_INT, "Seed of the class split.")
    datasets: str | None = common.folder_field(
        None, "Offline data folder holding omniglot/ and mnist/ (default: $METANET_DATASETS, "
        "else TFDS downloads).",
    )  # fmt: skip
    mini_imagenet_dir: str | None = common.folder_field(
        None, "Mini-ImageNet folder (CSV splits + images), --dataset=mini_imagenet only.",
        must_exist=False,
    )  # fmt: skip
    synthetic_size: int = common.int_field(
        28, 4, 128, "Image size of --dataset=synthetic (smoke tests)."
    )
    rotate: bool = common.bool_field(True, "Rotate each training class by k*90 degrees.")
    rotations_as_classes: bool = common.bool_field(
        False, "The 4 rotations of a training class are 4 classes."
    )
    translate: int = common.int_field(
        0, 0, 8, "Move each training image by a random whole number of pixels, up to this many "
        "in each direction, zero fill (0: off; an augmentation not in the paper).",
    )  # fmt: skip


@dataclasses.dataclass(frozen=True)
class OptimSpec(common.Spec):
    """The optimisation of a run beyond the model's optimiser flags (`RunSpec.optim`): tasks
    per update, updates, and the seed of the initialisation, episodes and keys."""

    meta_batch: int = common.int_field(1, 1, 1024, "Tasks (episodes) per update.")
    steps: int = common.int_field(1000, 1, 10**8, "Total updates to reach (resume included).")
    seed: int = common.int_field(0, 0, common.MAX_INT, "Seed of init, training episodes, keys.")


@dataclasses.dataclass(frozen=True)
class ScheduleSpec(common.Spec):
    """When and how much a run validates, tests, checkpoints and logs (`RunSpec.schedule`):
    none of it changes the trained model, so all of it may change on resume."""

    eval_every: int = common.int_field(500, 1, 10**8, "Validate every this many steps.")
    eval_episodes: int = common.int_field(200, 1, 10**6, "Validation episodes.")
    test_episodes: int = common.int_field(1000, 1, 10**6, "Final test episodes.")
    mnist_test_episodes: int = common.int_field(
        0, 0, 10**6, "Also test MNIST 10-way 1-shot out of domain (0: off)."
    )
    eval_batch: int = common.int_field(50, 1, 10**4, "Episodes per evaluation batch.")
    checkpoint_every: int = common.int_field(
        500, 1, 10**8, "Checkpoint every this many steps (and after each validation)."
    )
    keep_checkpoints: int = common.int_field(
        3, 1, 1000, "Latest checkpoints kept (the best one is kept as well)."
    )
    log_every: int = common.int_field(50, 1, 10**8, "Progress line every this many steps.")


# Flags (flat names) that may differ between runs on one workdir (everything else defines
# the model or the data and is compared with the workdir's config.json): the schedule's (it
# does not change the trained model), the steps to reach, where the files are, and the
# generator kernel (an execution choice: the same mathematics).
MUTABLE_FIELDS = frozenset(
    {"steps", "workdir", "datasets", "mini_imagenet_dir", "generator_kernel",
     *ScheduleSpec.flag_names()}
)  # fmt: skip


@dataclasses.dataclass(frozen=True)
class RunSpec(common.Spec):
    """Everything that defines a training run: the flags of `experiments/omniglot.py`, each
    field with its flag's default, checks and help (`common.Spec`), grouped by concern:
    `data` (`DataSpec`), `model` (`MODEL_FLAGS`), `optim` (`OptimSpec`), `schedule`
    (`ScheduleSpec`); `workdir` and the episodes' ways and queries beside `model`. Build one
    from flat flags with `RunSpec.from_flags`; `to_dict` gives them back (config.json's).

    `model`'s `image_shape` is replaced by the data's when the run starts. Model sizes left
    at `None` take the architecture's defaults (METANET.md). `eval_ways`, `train_ways` and
    `eval_queries_per_class` stay on the spec, not in a group: each qualifies the model's
    ways or queries and every check on them is against `model` (`_check_flags`). `eval_ways`
    (`None`: `model.ways`) is the ways of the validation and test episodes, which use the
    first `eval_ways` output units of b and of u's head (`evaluation.eval_config`).
    `train_ways` (empty: `model.ways` only) lists the ways a training episode may have: step
    t's episodes draw one of them uniformly, decided by `(optim.seed, t)` alone
    (`step_ways`), so that one model learns fast weights that hold for every number of
    classes it will be tested on (a MetaNet trained on one N reads its memory as calibrated
    for N support slots; docs/RESULTS.md, ways_levers).
    """

    MODEL_FLAGS: ClassVar[Mapping[str, common.Flag]] = MODEL_FLAGS

    workdir: str = common.workdir_field("Run folder (config.json, checkpoints, metrics, results).")
    data: DataSpec = DataSpec()
    model: MetaNetConfig = MetaNetConfig()
    # --- the episodes, beside the model's ways, shots and queries
    eval_queries_per_class: int = common.int_field(
        10, 1, 100, "Query examples per class in validation and test episodes."
    )
    eval_ways: int | None = common.int_field(
        None, 2, 1000, "Classes per validation and test episode (unset: --ways); at most "
        "--max_ways (else --ways): they use b's first eval_ways output units.", unset=True,
    )  # fmt: skip
    train_ways: tuple[int, ...] = common.ints_field(
        (), 2, 1000, "Ways a training episode may have, one drawn per step (e.g. 5,10,15,20; "
        "empty: --ways only), each at most --max_ways. A model trained on one N reads its "
        "memory as calibrated for N supports: mix the ways it will be tested on.",
    )  # fmt: skip
    optim: OptimSpec = OptimSpec()
    schedule: ScheduleSpec = ScheduleSpec()

    def replace(self, **flags) -> RunSpec:
        """A copy with some flat flags changed (model flags included)."""
        return RunSpec.from_flags({**self.to_dict(), **flags})

    def __post_init__(self):
        ways = self.train_ways  # a list from flags and config.json, or "5,10" text
        ways = tuple(int(w) for w in (ways.split(",") if isinstance(ways, str) else ways))
        object.__setattr__(self, "train_ways", ways)
        units = self.model.output_units
        bad = [w for w in ways if not 2 <= w <= units]
        if bad:
            raise ValueError(
                f"train_ways {list(ways)}: {bad} outside 2..{units}, the output units of b "
                "(raise --max_ways)"
            )
        if len(set(ways)) != len(ways):
            raise ValueError(f"train_ways {list(ways)} names a number of ways twice")
        self._check_flags()

    def _check_flags(self) -> None:
        """The checks across flags that need no data (the model's own are `MetaNetConfig`'s;
        those against the data's sizes are `check_pools`). One place for the programs and for
        specs read back from config.json.

        Raises:
          ValueError: naming the flags.
        """
        model, data = self.model, self.data
        if self.eval_ways is not None and self.eval_ways > model.output_units:
            raise ValueError(
                f"--eval_ways={self.eval_ways} must be unset or <= --max_ways (else --ways): "
                f"the model's {model.output_units} output units"
            )
        if data.validation_alphabets and data.dataset == "omniglot" and data.split == "previous":
            raise ValueError(
                "--validation_alphabets needs an Omniglot split whose test set is whole "
                "alphabets (standard, small1, small2, small); the previous split mixes alphabets"
            )
        need = model.shots + max(model.queries_per_class, self.eval_queries_per_class)
        if data.dataset == "omniglot" and need > 20:
            raise ValueError(
                f"--shots + --queries_per_class (and + --eval_queries_per_class) = {need} must "
                "be <= 20, the drawings per Omniglot character"
            )
        mini = (data.dataset == "mini_imagenet", model.architecture == "mini_imagenet_cnn")
        if data.dataset != "synthetic" and mini[0] != mini[1]:  # synthetic: any network
            raise ValueError(
                "--dataset=mini_imagenet needs --architecture=mini_imagenet_cnn, and "
                "--dataset=omniglot one of omniglot_cnn, mlp or rows_lstm (synthetic: any)"
            )

    def step_ways(self, step: int) -> int:
        """The ways of training step `step`'s episodes: `model.ways`, or (`train_ways`) one
        of those drawn uniformly by a generator seeded with `(optim.seed, step)` only."""
        if not self.train_ways:
            return self.model.ways
        pick = np.random.default_rng((self.optim.seed, step)).integers(len(self.train_ways))
        return self.train_ways[pick]

    def test_ways(self) -> int:
        """The ways of validation and test episodes (`eval_ways`, else the model's ways)."""
        return self.model.ways if self.eval_ways is None else self.eval_ways

    def eval_protocol(self, subset: str = "test"):
        """The run's fixed `evaluation.Protocol` of `subset` ("test" or "validation"):
        `schedule.test_episodes` episodes of `TEST_SEED`, or `schedule.eval_episodes` of
        `VALIDATION_SEED`; `test_ways()`-way `shots`-shot with `eval_queries_per_class`
        queries, batches of `schedule.eval_batch`."""
        from metanet_jax.evaluation import Protocol

        if subset not in ("test", "validation"):
            raise ValueError(f"subset must be 'test' or 'validation', got {subset!r}")
        test, schedule = subset == "test", self.schedule
        return Protocol(
            ways=self.test_ways(),
            shots=self.model.shots,
            queries_per_class=self.eval_queries_per_class,
            episodes=schedule.test_episodes if test else schedule.eval_episodes,
            seed=TEST_SEED if test else VALIDATION_SEED,
            batch=schedule.eval_batch,
        )

    def mnist_protocol(self):
        """The MNIST out-of-domain test (METANET.md): `schedule.mnist_test_episodes` (else
        `schedule.test_episodes`) 10-way 1-shot episodes of MNIST's test digits, `MNIST_SEED`."""
        from metanet_jax.evaluation import Protocol

        schedule = self.schedule
        return Protocol(
            ways=10,
            shots=1,
            queries_per_class=self.eval_queries_per_class,
            episodes=schedule.mnist_test_episodes or schedule.test_episodes,
            seed=MNIST_SEED,
            batch=schedule.eval_batch,
        )


def check_pools(spec: RunSpec, splits: Mapping[str, np.ndarray]) -> None:
    """Whether the data holds the run's episodes: the ways, shots and queries of training,
    validation and test against each split's classes and examples.

    Raises:
      ValueError: naming the flag and the sizes.
    """
    for name, images in splits.items():
        if images.shape[0] == 0 and name != "validation":
            raise ValueError(f"the {name} split of {spec.data.dataset}/{spec.data.split} is empty")
        _check_pool(spec, name, images.shape)
    if splits["validation"].shape[0] == 0:
        raise ValueError(
            f"split {spec.data.split!r} has no validation classes (--validation_classes=0?); "
            "checkpoint selection needs them"
        )


def _check_pool(spec: RunSpec, name: str, shape: tuple[int, ...]) -> None:
    """Whether the `name` split's classes `[C, D, ...]` hold the run's episodes."""
    classes, per_class = shape[0], shape[1]
    pool = classes * (4 if spec.data.rotations_as_classes and name == "train" else 1)
    most = max((spec.model.ways, *spec.train_ways))
    if name == "train" and most > pool:
        flag = "--ways" if most == spec.model.ways else "--train_ways"
        raise ValueError(f"{flag} asks for {most} classes, more than the {pool} training classes")
    if name != "train" and classes and spec.test_ways() > classes:
        flag = "--ways" if spec.eval_ways is None else "--eval_ways"
        raise ValueError(f"{flag}={spec.test_ways()} is more than the {classes} {name} classes")
    need = spec.model.shots + max(spec.model.queries_per_class, spec.eval_queries_per_class)
    if classes and need > per_class:
        raise ValueError(
            f"--shots + --queries_per_class/--eval_queries_per_class = {need} is more than "
            f"the {per_class} examples per class"
        )
