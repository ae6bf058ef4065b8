"""The training run behind `experiments/omniglot.py`: data, workdir, loop, checkpoints, results.

`RunSpec` is the complete, frozen description of a run: the program's flags, the model's as
a nested `MetaNetConfig` (`RunSpec.from_flags` / `RunSpec.to_dict` convert from and to the
flat flags). `train_and_evaluate(spec)` does the work; the program only parses and validates
flags. Its loop is the library's (`metanet_jax.runtime`: the train step of `make_step`,
compiled ahead of time, the episodes of `episode_source`, logs, validation and checkpoints at
the spec's `Cadence`); `Loop`, `run_loop`, `episode_source`, `StopRequest`,
`jitted_train_step` and `is_sharded` keep their names here.

Workdir layout (`spec.workdir`):

* `config.json`: every flag of the spec (flat), the model configuration and the library
  versions. A later run on the same workdir must agree on every flag outside
  `MUTABLE_FIELDS`.
* `checkpoints/<step>/`: orbax checkpoints (`metanet_jax.checkpointing`).
* `metrics.jsonl`, `tensorboard/`: scalars (`metanet_jax.logging_utils.MetricsWriter`).
* `results.json`, `results.md`, `learning_curve.png`, `attention.png`: written at the end.

Devices and processes (docs/SCALING.md): the meta-batch is split over a 1-D mesh of all
devices of all processes (`metanet_jax.parallel`). With one device in one process the run is
exactly the single-device program (`training.make_train_step`); otherwise the step is
`parallel.make_sharded_train_step` and each process gathers only the episodes of its own
tasks. The episodes are the same either way (`parallel.sample_process_episodes`). Only
process 0 writes config.json, metrics, TensorBoard, results and plots; every process takes
part in the orbax checkpoint saves and restores and evaluates on its own first device.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar

import jax
import numpy as np
from absl import logging

from experiments import common, records, workdir
from metanet_jax import checkpointing, evaluation, kernels, logging_utils, parallel, runtime
from metanet_jax.config import LEGACY_VALUES, MetaNetConfig
from metanet_jax.data import SPLIT_SCHEMES
from metanet_jax.model.episode import init
from metanet_jax.synthetic import synthetic_classes
from metanet_jax.training import TrainState, init_train_state, make_optimizer, make_train_step

# Seeds of the fixed evaluation episode sets: independent of the training seed, so runs with
# different seeds are compared on the same episodes.
VALIDATION_SEED = 1
TEST_SEED = 2
MNIST_SEED = 3

DATASETS = ("omniglot", "mini_imagenet", "synthetic")

# Fields that may differ between runs on one workdir (everything else defines the model or
# the data and is compared with the workdir's config.json).
MUTABLE_FIELDS = frozenset(
    {
        "steps",
        "workdir",
        "datasets",
        "mini_imagenet_dir",
        "eval_every",
        "eval_episodes",
        "test_episodes",
        "mnist_test_episodes",
        "eval_batch",
        "checkpoint_every",
        "keep_checkpoints",
        "log_every",
        "generator_kernel",  # an execution choice: the same mathematics
    }
)


# RunSpec fields added after workdirs were first written, with the value a config.json
# without them meant (the model's fields as in `config.LEGACY_VALUES`).
LEGACY_RUN_VALUES = {
    **LEGACY_VALUES,
    "validation_alphabets": 0,
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
class RunSpec(common.Spec):
    """Everything that defines a training run: the flags of `experiments/omniglot.py`, each
    field with its flag's default, checks and help (`common.Spec`).

    `model` holds the model's flags (`MODEL_FLAGS`; its `image_shape` is replaced by the
    data's when the run starts). Model sizes left at `None` take the architecture's defaults
    (METANET.md). `eval_ways` (`None`: `model.ways`) is the ways of the validation and test
    episodes, which use the first `eval_ways` output units of b and of u's head
    (`evaluation.eval_config`). `train_ways` (empty: `model.ways` only) lists the ways a
    training episode may have: step t's episodes draw one of them uniformly, decided by
    `(seed, t)` alone (`step_ways`), so that one model learns fast weights that hold for
    every number of classes it will be tested on (a MetaNet trained on one N reads its memory
    as calibrated for N support slots; docs/RESULTS.md, ways_levers). Build one from flat
    flags with `RunSpec.from_flags`.
    """

    MODEL_FLAGS: ClassVar[Mapping[str, common.Flag]] = MODEL_FLAGS

    # --- where
    workdir: str = common.workdir_field("Run folder (config.json, checkpoints, metrics, results).")
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
    # --- the model (MODEL_FLAGS) and the episodes
    model: MetaNetConfig = MetaNetConfig()
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
    # --- optimisation
    meta_batch: int = common.int_field(1, 1, 1024, "Tasks (episodes) per update.")
    steps: int = common.int_field(1000, 1, 10**8, "Total updates to reach (resume included).")
    rotate: bool = common.bool_field(True, "Rotate each training class by k*90 degrees.")
    rotations_as_classes: bool = common.bool_field(
        False, "The 4 rotations of a training class are 4 classes."
    )
    seed: int = common.int_field(0, 0, common.MAX_INT, "Seed of init, training episodes, keys.")
    # --- evaluation, checkpoints, logging
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

    def step_ways(self, step: int) -> int:
        """The ways of training step `step`'s episodes: `model.ways`, or (`train_ways`) one
        of those drawn uniformly by a generator seeded with `(seed, step)` only."""
        if not self.train_ways:
            return self.model.ways
        pick = np.random.default_rng((self.seed, step)).integers(len(self.train_ways))
        return self.train_ways[pick]

    def test_ways(self) -> int:
        """The ways of validation and test episodes (`eval_ways`, else the model's ways)."""
        return self.model.ways if self.eval_ways is None else self.eval_ways


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


# ----------------------------------------------------------------------------- data
def load_splits(spec: RunSpec) -> dict[str, np.ndarray]:
    """The train/validation/test class arrays of `spec.dataset` (reads only; fails fast):
    `{"train", "validation", "test"}` -> `[C, D, H, W, ch]` uint8 arrays (numpy).

    Raises:
      FileNotFoundError: a configured data folder or file is missing.
    """
    from metanet_jax import data

    if spec.dataset == "omniglot":
        parts = data.load_omniglot(
            spec.split,
            manual_dir=spec.datasets,
            validation_classes=spec.validation_classes,
            validation_alphabets=spec.validation_alphabets,
            seed=spec.split_seed,
        )
        return {k: v.images for k, v in parts.items()}
    if spec.dataset == "mini_imagenet":
        folder = spec.mini_imagenet_dir
        if not folder or not Path(folder).is_dir():
            raise FileNotFoundError(
                f"--mini_imagenet_dir={folder!r}: no such folder. Mini-ImageNet is not "
                "distributed with this project; see docs/DATA.md for the expected layout "
                "(Ravi & Larochelle's train/val/test CSVs and the images folder)."
            )
        names = {"train": "train", "validation": "val", "test": "test"}
        return {k: data.load_mini_imagenet(folder, v).images for k, v in names.items()}
    if spec.dataset == "synthetic":
        s = spec.synthetic_size
        return {
            "train": synthetic_classes(10, 40, 20, s),
            "validation": synthetic_classes(11, 20, 20, s),
            "test": synthetic_classes(12, 20, 20, s),
        }
    raise ValueError(f"unknown dataset {spec.dataset!r}; expected one of {DATASETS}")


def model_config(spec: RunSpec, image_shape: tuple[int, ...]) -> MetaNetConfig:
    """The `MetaNetConfig` of a run: its model with the data's image shape."""
    return dataclasses.replace(spec.model, image_shape=tuple(int(s) for s in image_shape))


# ----------------------------------------------------------------------------- the run
# Names that moved to experiments.workdir (the workdir's config.json) and metanet_jax.runtime /
# parallel (the library's loop), still importable from here (PEP 562).
_MOVED = {
    **dict.fromkeys(
        "WorkdirMismatch WorkdirError json_value saved_flags check_workdir data_record "
        "check_data_record write_workdir_config".split(),
        workdir,
    ),
    **dict.fromkeys("Loop run_loop episode_source StopRequest".split(), runtime),
    "jitted_train_step": runtime.steps,
    "is_sharded": parallel,
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(_MOVED[name], "single_device_step" if name == "jitted_train_step" else name)


def _eval_batches(images, cfg: MetaNetConfig, n: int, spec: RunSpec, seed: int, permutations=None):
    from metanet_jax import data

    return data.fixed_eval_episodes(
        seed,
        images,
        cfg.ways,
        cfg.shots,
        cfg.queries_per_class,
        n,
        min(spec.eval_batch, n),
        rotate=False,
        permutations=permutations,
    )


@dataclasses.dataclass(frozen=True)
class _Run:
    """What every phase of a started run reads (none of it changes during the run)."""

    spec: RunSpec
    config: MetaNetConfig
    splits: Mapping[str, np.ndarray]
    mesh: Any
    ckpt: checkpointing.Checkpointer
    writer: Any  # logging_utils.MetricsWriter on process 0, else runtime.NullWriter
    stop: runtime.StopRequest
    t_start: float  # when this process started the run
    wall_before: float  # wall time of the run's earlier segments (before the resume)

    def meta(self) -> dict[str, Any]:
        """The metadata saved with a checkpoint."""
        return {
            "model_config": checkpointing.config_to_dict(self.config),
            "flags": self.spec.to_dict(),
            "wall_time_s": self.wall_before + time.time() - self.t_start,
        }

    def eval_config(self) -> MetaNetConfig:
        """The model configuration of validation and test episodes."""
        spec = self.spec
        return evaluation.eval_config(
            self.config, spec.test_ways(), spec.model.shots, spec.eval_queries_per_class
        )

    def loop_context(self) -> runtime.LoopContext:
        """The run as its training loop sees it (`runtime.train`)."""
        spec, cfg = self.spec, self.eval_config()
        images = jax.device_put(self.splits["validation"])

        def validate(params):
            batches = _eval_batches(images, cfg, spec.eval_episodes, spec, VALIDATION_SEED)
            return evaluation.evaluate(params, cfg, batches)

        cadence = runtime.Cadence(
            spec.steps, spec.log_every, spec.eval_every, spec.checkpoint_every, spec.meta_batch
        )
        return runtime.LoopContext(
            cadence, self.ckpt, self.writer, self.stop, validate=validate, meta=self.meta
        )


def train_and_evaluate(
    spec: RunSpec,
    *,
    step_factory: Callable = make_train_step,
    splits: Mapping[str, np.ndarray] | None = None,
    mesh=None,
) -> dict[str, Any]:
    """Trains (or resumes) a run, then tests its best checkpoint; writes the workdir.

    In a multi-process run every process calls this with the same spec (after
    `parallel.initialize_distributed`).

    Args:
      spec: the run.
      step_factory: `(config, optimizer, validate=...) -> train_step` (tests inject faults;
        used as given, also on several devices).
      splits: preloaded class arrays (default: `load_splits(spec)`).
      mesh: the 1-D device mesh (default `parallel.make_mesh()`: all devices of all
        processes); the meta-batch must be a multiple of its size.

    Returns:
      `{"status": "completed" | "interrupted" | "nan", ...}`; for "completed" the content of
      `results.json`.

    Raises:
      WorkdirMismatch, WorkdirError, FileNotFoundError, checkpointing.CheckpointError:
        before training.
      ValueError: bad sizes, e.g. a meta-batch that the devices do not divide (at once).
    """
    t_start = time.time()
    mesh = parallel.make_mesh() if mesh is None else mesh
    parallel.check_meta_batch(spec.meta_batch, mesh)  # before any work
    logging.info(parallel.device_summary(mesh, spec.meta_batch))
    logging.info(kernels.describe(spec.model))  # ValueError: "fused" where it cannot run
    splits = _load_data(spec) if splits is None else splits
    run, state = _start_run(spec, splits, mesh, t_start)
    try:
        outcome = runtime.train(_start_loop(run, state, step_factory), run.loop_context())
        if outcome["status"] != "completed":
            return outcome
        return _final_test(run, outcome)
    finally:
        run.stop.close()
        run.writer.close()
        run.ckpt.close()


def _start_run(
    spec: RunSpec, splits: Mapping[str, np.ndarray], mesh, t_start: float
) -> tuple[_Run, TrainState]:
    """Checks and writes the workdir, then restores the latest checkpoint (or starts anew);
    opens the metrics writer and installs the signal handlers."""
    config = _prepare_workdir(spec, splits)
    ckpt = checkpointing.Checkpointer(
        evaluation.checkpoint_dir(Path(spec.workdir)), keep=spec.keep_checkpoints
    )
    state, wall_before = _initial_state(spec, config, ckpt)
    if parallel.is_primary():
        writer = logging_utils.MetricsWriter(Path(spec.workdir), resume_step=int(state.step))
    else:
        writer = runtime.NullWriter()
    run = _Run(
        spec=spec,
        config=config,
        splits=splits,
        mesh=mesh,
        ckpt=ckpt,
        writer=writer,
        stop=runtime.StopRequest(),
        t_start=t_start,
        wall_before=wall_before,
    )
    return run, state


def _load_data(spec: RunSpec) -> dict[str, np.ndarray]:
    """The run's class arrays; fails before any write. Process 0 prepares the data caches
    before the others read them."""
    splits = load_splits(spec) if parallel.is_primary() else None
    parallel.barrier("experiments.train:data")
    return load_splits(spec) if splits is None else splits


def _prepare_workdir(spec: RunSpec, splits: Mapping[str, np.ndarray]) -> MetaNetConfig:
    """Checks the sizes, the workdir's config.json and data record (refusing before writing
    anything), then writes config.json (process 0). Returns the run's model configuration."""
    config = model_config(spec, tuple(splits["train"].shape[2:]))
    _check_pools(spec, config, splits)
    saved = workdir.check_workdir(spec)
    data_info = workdir.data_record(spec)
    workdir.check_data_record(spec, saved, data_info)
    parallel.barrier("experiments.train:checked")  # every process read config.json before
    if parallel.is_primary():
        workdir.write_workdir_config(spec, config, data_info)
    return config


def _initial_state(
    spec: RunSpec, config: MetaNetConfig, ckpt: checkpointing.Checkpointer
) -> tuple[TrainState, float]:
    """The latest good checkpoint's state, else a fresh one; and the wall time before it."""
    root = jax.random.key(spec.seed)
    params = init(jax.random.fold_in(root, 0), config)
    state = init_train_state(params, make_optimizer(config), jax.random.fold_in(root, 1))
    restored = ckpt.restore_latest(state)
    if restored is None:
        logging.info("starting a new run in %s", spec.workdir)
        return state, 0.0
    state, meta = restored
    logging.info("resumed from step %d (%s)", int(state.step), ckpt.step_path(int(state.step)))
    return state, float(meta.get("wall_time_s", 0.0))


def _check_pools(spec: RunSpec, config: MetaNetConfig, splits: Mapping[str, np.ndarray]) -> None:
    units = config.output_units
    if spec.test_ways() > units:
        raise ValueError(
            f"--eval_ways={spec.eval_ways} is more than the model's {units} output units "
            "(--max_ways, else --ways)"
        )
    for name, images in splits.items():
        if images.shape[0] == 0 and name != "validation":
            raise ValueError(f"the {name} split of {spec.dataset}/{spec.split} is empty")
        _check_pool(spec, name, images.shape)
    if splits["validation"].shape[0] == 0:
        raise ValueError(
            f"split {spec.split!r} has no validation classes (--validation_classes=0?); "
            "checkpoint selection needs them"
        )


def _check_pool(spec: RunSpec, name: str, shape: tuple[int, ...]) -> None:
    """Whether the `name` split's classes `[C, D, ...]` hold the run's episodes."""
    classes, per_class = shape[0], shape[1]
    pool = classes * (4 if spec.rotations_as_classes and name == "train" else 1)
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


def _start_loop(run: _Run, state: TrainState, step_factory: Callable) -> runtime.TrainingLoop:
    """The run's loop from the state's step: its train step (`runtime.make_step`, compiling
    ahead of time), its episodes and its progress bar."""
    from metanet_jax import data

    spec, sharded = run.spec, parallel.is_sharded(run.mesh)
    make = None
    if step_factory is not make_train_step:  # used as given, also on several devices

        def make(config):
            return step_factory(config, make_optimizer(config), validate=False)

    step_fn = runtime.make_step(run.config, ways=spec.train_ways, mesh=run.mesh, make=make)
    if sharded:
        state = parallel.replicate(state, run.mesh)
        sample = functools.partial(parallel.sample_process_episodes, mesh=run.mesh)
    else:
        sample = data.sample_episodes
    episodes = runtime.episode_source(
        sample,
        jax.random.fold_in(jax.random.key(spec.seed), 2),
        jax.device_put(run.splits["train"]),
        run.config,
        spec.meta_batch,
        spec.step_ways,
        rotate=spec.rotate,
        rotations_as_classes=spec.rotations_as_classes,
    )
    out = None if parallel.is_primary() else io.StringIO()
    start = int(state.step)
    return runtime.TrainingLoop(
        state=state,
        step_fn=step_fn,
        episodes=episodes,
        start=start,
        bar=logging_utils.ProgressBar(spec.steps, out),
        last_saved=run.ckpt.latest_step(),
        compilations=_compile_ahead(run, step_fn, state, start),
    )


def _compile_ahead(run: _Run, step_fn: runtime.TrainStep, state, start: int):
    """Starts compiling the training step of every ways, then the validation step, on threads
    (`runtime.steps`; the loop waits for each before its first use). Not in a run of several
    processes (each would compile on its own schedule) nor when there is nothing to train.

    Returns:
      The `runtime.Compilations`, or `None`.
    """
    spec = run.spec
    if start >= spec.steps or jax.process_count() > 1:
        return None
    compilations = step_fn.compile(state, spec.meta_batch, first=spec.step_ways(start))
    if compilations is not None:
        cfg = run.eval_config()
        batch = min(spec.eval_batch, spec.eval_episodes)
        support, query = runtime.steps.episode_shapes(cfg, cfg.ways, batch)
        params = runtime.steps.abstract(parallel.local_copy(state.params))
        fn = evaluation._episode_loss(cfg)
        programs = runtime.steps.programs(fn, params, support, query)
        # After the training steps': the first steps need those, the first validation later.
        compilations.submit("eval", programs, after=[("train", w) for w in step_fn.ways])
    return compilations


def _final_test(run: _Run, outcome: Mapping[str, Any]) -> dict[str, Any]:
    """Tests the best checkpoint; writes results and plots (process 0). A signal during the
    test stops it (the rerun tests)."""
    try:
        results = _test(run, outcome)
    except runtime.Interrupted:
        step = run.ckpt.latest_step()
        logging.warning(
            "%s received during the final test: stopped it; training is complete (checkpoint "
            "of step %d in %s); run the same command again to test",
            run.stop.signal_name,
            step,
            run.ckpt.directory,
        )
        return {"status": "interrupted", "step": step, "signal": run.stop.signal_name,
                "phase": "test"}  # fmt: skip
    if run.stop.signal_name is not None:
        logging.warning(
            "%s received after the final test: the results were written in full",
            run.stop.signal_name,
        )
    return results


def _test(run: _Run, outcome: Mapping[str, Any]) -> dict[str, Any]:
    spec, config = run.spec, run.config
    # The best good checkpoint: a corrupt one is set aside and the next best used.
    restored = run.ckpt.restore_best(evaluation.fresh_state(config))
    assert restored is not None  # the loop saved the last step at least
    state, _ = restored
    step = int(state.step)
    test_cfg = run.eval_config()
    t0 = time.time()
    images = jax.device_put(run.splits["test"])
    batches = _eval_batches(images, test_cfg, spec.test_episodes, spec, TEST_SEED)
    test = evaluation.evaluate(
        state.params, test_cfg, runtime.interruptible(batches, run.stop), keep_first=True
    )
    logging.info("test (checkpoint of step %d) %s", step, test.line())
    counts = parallel.device_counts(run.mesh)
    mnist = {}
    if spec.mnist_test_episodes:
        mnist = _mnist_out_of_domain(spec, config, state.params, run.stop)
    # results.json (experiments.records): every field given is written, null included.
    results = records.RunResults.written(
        config=spec.to_dict(),
        model_config=checkpointing.config_to_dict(config),
        steps=spec.steps,
        evaluated_step=step,
        test_ways=test_cfg.ways,
        best_validation_accuracy=run.ckpt.validation_accuracy(step),
        test_accuracy=test.mean,
        test_ci95=test.ci95,
        test_episodes=test.episodes,
        devices=counts["devices"],
        processes=counts["processes"],
        platform=counts["platform"],
        versions=logging_utils.library_versions(),
        episodes_per_s=outcome.get("episodes_per_s"),
        **mnist,
        wall_time_s=run.wall_before + time.time() - run.t_start,
        test_time_s=time.time() - t0,
    ).to_json()
    if parallel.is_primary():
        _write_results(run, results, test)
    return dict(results, status="completed")


def _write_results(run: _Run, results: Mapping[str, Any], test) -> None:
    """results.json/md, the learning curve and the first test episode's attention."""
    workdir = Path(run.spec.workdir)
    logging_utils.write_results(workdir, results)
    records = logging_utils.read_metrics(workdir / "metrics.jsonl")
    logging_utils.plot_learning_curve(records, workdir / "learning_curve.png")
    support, query, attention = test.first
    logging_utils.plot_attention(
        attention, support.x, support.y, query.x, query.y, workdir / "attention.png"
    )
    run.writer.write(run.spec.steps, {"test_accuracy": test.mean})


def _mnist_out_of_domain(spec: RunSpec, config: MetaNetConfig, params, stop) -> dict[str, Any]:
    from metanet_jax import data

    mnist = data.load_mnist(manual_dir=spec.datasets)
    cfg = evaluation.eval_config(config, 10, 1, spec.eval_queries_per_class)
    images = jax.device_put(mnist["test"].images)
    batches = _eval_batches(images, cfg, spec.mnist_test_episodes, spec, MNIST_SEED)
    result = evaluation.evaluate(params, cfg, runtime.interruptible(batches, stop))
    logging.info("MNIST 10-way 1-shot (out of domain) %s", result.line())
    return {"mnist_accuracy": result.mean, "mnist_ci95": result.ci95,
            "mnist_episodes": result.episodes}  # fmt: skip


def environment_summary() -> str:
    """One line: devices and the data folders in use."""
    return (
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
        f"METANET_DATASETS={os.environ.get('METANET_DATASETS', '<unset>')}; "
        f"METANET_DATA_DIR={os.environ.get('METANET_DATA_DIR', '<default>')}"
    )
