"""The training run behind `experiments/omniglot.py`: data, workdir, loop, checkpoints, results.

`RunSpec` is the complete, frozen description of a run (one field per flag of the program).
`train(spec)` does the work; the program only parses and validates flags.

Workdir layout (`spec.workdir`):

* `config.json`: every field of the spec, the model configuration and the library versions.
  A later run on the same workdir must agree on every field outside `MUTABLE_FIELDS`.
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
import json
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from metanet_jax import checkpointing, evaluation, logging_utils, parallel
from metanet_jax.config import LEGACY_VALUES, MetaNetConfig
from metanet_jax.model.episode import init
from metanet_jax.training import init_train_state, make_optimizer, make_train_step

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
    }
)


# RunSpec fields added after workdirs were first written, with the value a config.json
# without them meant (the model's fields as in `config.LEGACY_VALUES`).
LEGACY_RUN_VALUES = {
    **LEGACY_VALUES,
    "validation_alphabets": 0,
}


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """Everything that defines a training run (the flags of `experiments/omniglot.py`).

    Model sizes left at `None` take the architecture's defaults (METANET.md). `eval_ways`
    (`None`: `ways`) is the ways of the validation and test episodes, which use the first
    `eval_ways` output units of b and of u's head (`evaluation.eval_config`).
    """

    workdir: str
    dataset: str = "omniglot"
    split: str = "standard"
    validation_classes: int = 100
    validation_alphabets: int = 0
    split_seed: int = 0
    datasets: str | None = None
    mini_imagenet_dir: str | None = None
    synthetic_size: int = 28
    ways: int = 5
    shots: int = 1
    queries_per_class: int = 10
    eval_queries_per_class: int = 10
    eval_ways: int | None = None
    max_ways: int | None = None
    meta_batch: int = 1
    steps: int = 1000
    learning_rate: float = 1e-3
    clip_norm: float = 10.0
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    schedule_steps: int = 0
    generator_init: str = "small"
    network_init: str = "he"
    label_units: str = "first"
    variant: str = "metanet"
    base_input: str = "x"
    architecture: str = "omniglot_cnn"
    conv_channels: int | None = None
    num_conv_layers: int | None = None
    hidden_units: int | None = None
    rep_chunks: int = 5
    second_order: bool = False
    rep_loss_in_objective: bool = False
    rotate: bool = True
    rotations_as_classes: bool = False
    task_batching: str = "auto"
    query_path: str = "auto"
    compute_dtype: str = "float32"
    bn_statistics: str = "authors"
    seed: int = 0
    eval_every: int = 500
    eval_episodes: int = 200
    test_episodes: int = 1000
    mnist_test_episodes: int = 0
    eval_batch: int = 50
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 50

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def test_ways(self) -> int:
        """The ways of validation and test episodes (`eval_ways`, else `ways`)."""
        return self.ways if self.eval_ways is None else self.eval_ways


class WorkdirMismatch(ValueError):
    """The workdir was created by a run with different model or data flags."""


class WorkdirError(ValueError):
    """The workdir cannot be created or written (names the path and the system's reason)."""


class NonFiniteLoss(RuntimeError):
    """Training produced a NaN or infinite loss."""


# ----------------------------------------------------------------------------- data
class Splits(dict):
    """`{"train", "validation", "test"}` -> `[C, D, H, W, ch]` uint8 arrays (numpy)."""


def synthetic_classes(seed: int, classes: int, per_class: int, size: int) -> np.ndarray:
    """A synthetic class array `[classes, per_class, size, size, 1]` uint8 for smoke runs.

    Each class is a random binary pattern; its examples flip a few pixels and add noise.
    """
    rng = np.random.default_rng(seed)
    protos = rng.random((classes, 1, size, size, 1)) < 0.3
    flips = rng.random((classes, per_class, size, size, 1)) < 0.05
    x = np.logical_xor(protos, flips).astype(np.float32)
    x = np.clip(x + 0.1 * rng.standard_normal(x.shape), 0, 1)
    return (255 * x).round().astype(np.uint8)


def load_splits(spec: RunSpec) -> Splits:
    """The train/validation/test class arrays of `spec.dataset` (reads only; fails fast).

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
        return Splits({k: v.images for k, v in parts.items()})
    if spec.dataset == "mini_imagenet":
        folder = spec.mini_imagenet_dir
        if not folder or not Path(folder).is_dir():
            raise FileNotFoundError(
                f"--mini_imagenet_dir={folder!r}: no such folder. Mini-ImageNet is not "
                "distributed with this project; see docs/DATA.md for the expected layout "
                "(Ravi & Larochelle's train/val/test CSVs and the images folder)."
            )
        names = {"train": "train", "validation": "val", "test": "test"}
        return Splits({k: data.load_mini_imagenet(folder, v).images for k, v in names.items()})
    if spec.dataset == "synthetic":
        s = spec.synthetic_size
        return Splits(
            train=synthetic_classes(10, 40, 20, s),
            validation=synthetic_classes(11, 20, 20, s),
            test=synthetic_classes(12, 20, 20, s),
        )
    raise ValueError(f"unknown dataset {spec.dataset!r}; expected one of {DATASETS}")


def model_config(spec: RunSpec, image_shape: tuple[int, ...]) -> MetaNetConfig:
    """The `MetaNetConfig` of a run."""
    return MetaNetConfig(
        ways=spec.ways,
        shots=spec.shots,
        queries_per_class=spec.queries_per_class,
        image_shape=tuple(int(s) for s in image_shape),
        variant=spec.variant,
        architecture=spec.architecture,
        conv_channels=spec.conv_channels,
        num_conv_layers=spec.num_conv_layers,
        hidden_units=spec.hidden_units,
        max_ways=spec.max_ways,
        base_input=spec.base_input,
        rep_chunks=spec.rep_chunks,
        second_order=spec.second_order,
        rep_loss_in_objective=spec.rep_loss_in_objective,
        query_path=spec.query_path,
        task_batching=spec.task_batching,
        learning_rate=spec.learning_rate,
        clip_norm=spec.clip_norm,
        compute_dtype=spec.compute_dtype,
        lr_schedule=spec.lr_schedule,
        warmup_steps=spec.warmup_steps,
        schedule_steps=spec.schedule_steps,
        generator_init=spec.generator_init,
        network_init=spec.network_init,
        label_units=spec.label_units,
        bn_statistics=spec.bn_statistics,
    )


# ----------------------------------------------------------------------------- workdir
def saved_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved flags (config.json's `"flags"`) as `RunSpec` fields.

    A field added after the run was saved counts as what the run did before the field
    existed: its `LEGACY_RUN_VALUES` entry where it has one, else its default. Fields this
    version does not know are dropped.
    """
    fields = {f.name: f.default for f in dataclasses.fields(RunSpec)}
    values = {k: v for k, v in fields.items() if v is not dataclasses.MISSING}
    values.update(LEGACY_RUN_VALUES)
    values.update({k: v for k, v in flags.items() if k in fields})
    return values


def check_workdir(spec: RunSpec) -> dict[str, Any] | None:
    """Compares `spec` with an existing workdir's `config.json` (reads only).

    Returns:
      The saved config, or `None` when the workdir has none yet.

    Raises:
      WorkdirMismatch: a model or data field differs; the message names each one.
    """
    path = Path(spec.workdir) / "config.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    was = saved_flags(saved.get("flags", {}))
    now = spec.to_dict()
    ignored = set(MUTABLE_FIELDS)
    if not MetaNetConfig(architecture=spec.architecture).resolved("batchnorm_layers"):
        ignored.add("bn_statistics")  # no BatchNorm layer: the same model either way
    diffs = [
        f"{k} ({was[k]!r} -> {now[k]!r})"
        for k in sorted(now)
        if k not in ignored and was[k] != now[k]
    ]
    if diffs:
        raise WorkdirMismatch(
            f"workdir {spec.workdir} was created with different model/data flags: "
            + ", ".join(diffs)
            + "; use a new --workdir (only "
            + ", ".join(sorted(MUTABLE_FIELDS - {"workdir"}))
            + " may change)"
        )
    return saved


def data_record(spec: RunSpec) -> dict[str, Any] | None:
    """What identifies the run's data beyond its flags: for Mini-ImageNet the SHA-256 of the
    split CSV files (`{"mini_imagenet_csv_sha256": {"train": ..., "val": ..., "test": ...}}`),
    recorded in config.json; `None` for the other data sets."""
    if spec.dataset != "mini_imagenet":
        return None
    from metanet_jax.data import mini_imagenet

    sums = {
        s: mini_imagenet.split_info(spec.mini_imagenet_dir, s)["sha256"]
        for s in mini_imagenet.SPLIT_CLASSES
    }
    return {"mini_imagenet_csv_sha256": sums}


def check_data_record(spec: RunSpec, saved: Mapping[str, Any] | None, record) -> None:
    """Refuses to resume a workdir whose recorded data (`data_record`) differs from now.

    Raises:
      WorkdirMismatch: naming each file whose checksum changed.
    """
    was = (saved or {}).get("data") or {}
    now = record or {}
    changed = [
        f"{group}/{name} ({old[:12]}... -> {now[group].get(name, 'missing')[:12]}...)"
        for group, old_sums in was.items()
        if group in now
        for name, old in old_sums.items()
        if now[group].get(name) != old
    ]
    if changed:
        raise WorkdirMismatch(
            f"workdir {spec.workdir} was trained on other data files: "
            + ", ".join(changed)
            + "; use a new --workdir"
        )


def write_workdir_config(
    spec: RunSpec, config: MetaNetConfig, data: Mapping[str, Any] | None = None
) -> None:
    """Creates the workdir and writes its config.json.

    Raises:
      WorkdirError: the folder cannot be created or written (e.g. a file of that name, or
        no permission), with the path and the reason in one line.
    """
    workdir = Path(spec.workdir)
    try:
        workdir.mkdir(parents=True, exist_ok=True)
        record = {
            "flags": spec.to_dict(),
            "model_config": checkpointing.config_to_dict(config),
            "versions": logging_utils.library_versions(),
        }
        if data:
            record["data"] = dict(data)
        logging_utils.write_json_atomic(workdir / "config.json", record)
    except OSError as e:
        raise WorkdirError(
            f"--workdir={spec.workdir}: cannot create or write it ({e.strerror or e}"
            + (f": {e.filename}" if e.filename else "")
            + ")"
        ) from e


# ----------------------------------------------------------------------------- signals
class StopRequest:
    """Turns SIGINT/SIGTERM into a flag the loop polls (handlers restored by `close`)."""

    def __init__(self):
        self.signal_name: str | None = None
        self._old = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        del frame
        self.signal_name = signal.Signals(signum).name

    def close(self) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        self._old = {}


# ----------------------------------------------------------------------------- the run
@functools.lru_cache(maxsize=8)
def _cached_train_step(config: MetaNetConfig):
    """One jitted train step per configuration, reused by later runs in the same process."""
    return make_train_step(config, make_optimizer(config), validate=False)


@functools.lru_cache(maxsize=8)
def _cached_sharded_step(config: MetaNetConfig, mesh):
    """The data-parallel train step over `mesh` (several devices or processes)."""
    return parallel.make_sharded_train_step(config, make_optimizer(config), mesh)


def is_sharded(mesh) -> bool:
    """Whether a run on `mesh` uses the data-parallel step (more than one device or process);
    a single device in a single process runs the single-device program unchanged."""
    return mesh.size > 1 or jax.process_count() > 1


def _local(tree):
    """This process's copy of replicated arrays (on its first device) for evaluation."""

    def local(x):
        if isinstance(x, jax.Array) and len(x.sharding.device_set) > 1:
            return x.addressable_data(0)
        return x

    return jax.tree.map(local, tree)


class _NullWriter:
    """The metrics writer of the processes other than process 0 (they write nothing)."""

    def write(self, step, values) -> None:
        del step, values

    def close(self) -> None:
        pass


def _any_process(flag: bool) -> bool:
    """Whether `flag` is set on any process (a collective: every process must call it)."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.any(multihost_utils.process_allgather(np.int32(flag))))


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


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


def train(
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
    primary = parallel.is_primary()
    logging.info(parallel.device_summary(mesh, spec.meta_batch))
    if splits is None:  # fails before any write; process 0 prepares data caches first
        splits = load_splits(spec) if primary else None
        _barrier("metanet_jax.experiment:data")
        splits = load_splits(spec) if splits is None else splits
    image_shape = tuple(splits["train"].shape[2:])
    config = model_config(spec, image_shape)
    _check_pools(spec, config, splits)
    saved = check_workdir(spec)  # refuses before writing anything
    data_info = data_record(spec)
    check_data_record(spec, saved, data_info)
    _barrier("metanet_jax.experiment:checked")  # every process read config.json before
    if primary:
        write_workdir_config(spec, config, data_info)
    workdir = Path(spec.workdir)

    optimizer = make_optimizer(config)
    root = jax.random.key(spec.seed)
    params = init(jax.random.fold_in(root, 0), config)
    state = init_train_state(params, optimizer, jax.random.fold_in(root, 1))
    data_key = jax.random.fold_in(root, 2)
    ckpt = checkpointing.Checkpointer(
        evaluation.checkpoint_dir(workdir), keep=spec.keep_checkpoints
    )
    meta_base = {"model_config": checkpointing.config_to_dict(config), "flags": spec.to_dict()}
    wall_before = 0.0
    restored = ckpt.restore_latest(state)
    if restored is not None:
        state, meta = restored
        wall_before = float(meta.get("wall_time_s", 0.0))
        logging.info("resumed from step %d (%s)", int(state.step), ckpt.step_path(int(state.step)))
    else:
        logging.info("starting a new run in %s", workdir)
    start = int(state.step)
    writer = logging_utils.MetricsWriter(workdir, resume_step=start) if primary else _NullWriter()
    stop = StopRequest()
    try:
        outcome = _loop(spec, config, optimizer, state, splits, data_key, ckpt, writer, stop,
                        step_factory, meta_base, wall_before, t_start, mesh)  # fmt: skip
        if outcome["status"] != "completed":
            return outcome
        try:
            results = _finish(spec, config, splits, ckpt, writer, outcome, t_start, wall_before,
                              mesh, stop)  # fmt: skip
        except _Interrupted:
            return _interrupted_test(stop, ckpt)
        if stop.signal_name is not None:
            logging.warning("%s received after the final test: the results were written in full",
                            stop.signal_name)  # fmt: skip
        return results
    finally:
        stop.close()
        writer.close()
        ckpt.close()


def _check_pools(spec: RunSpec, config: MetaNetConfig, splits: Mapping[str, np.ndarray]) -> None:
    units = config.output_units
    if spec.test_ways() > units:
        raise ValueError(
            f"--eval_ways={spec.eval_ways} is more than the model's {units} output units "
            "(--max_ways, else --ways)"
        )
    flag = "--ways" if spec.eval_ways is None else "--eval_ways"
    for name, images in splits.items():
        if images.shape[0] == 0 and name != "validation":
            raise ValueError(f"the {name} split of {spec.dataset}/{spec.split} is empty")
        pool = images.shape[0] * (4 if spec.rotations_as_classes and name == "train" else 1)
        if name == "train" and spec.ways > pool:
            raise ValueError(f"--ways={spec.ways} is more than the {pool} training classes")
        if name != "train" and images.shape[0] and spec.test_ways() > images.shape[0]:
            raise ValueError(
                f"{flag}={spec.test_ways()} is more than the {images.shape[0]} {name} classes"
            )
        need = spec.shots + max(spec.queries_per_class, spec.eval_queries_per_class)
        if images.shape[0] and need > images.shape[1]:
            raise ValueError(
                f"--shots + --queries_per_class/--eval_queries_per_class = {need} is more than "
                f"the {images.shape[1]} examples per class"
            )
    if splits["validation"].shape[0] == 0:
        raise ValueError(
            f"split {spec.split!r} has no validation classes (--validation_classes=0?); "
            "checkpoint selection needs them"
        )


def _loop(spec, config, optimizer, state, splits, data_key, ckpt, writer, stop, step_factory,
          meta_base, wall_before, t_start, mesh):  # fmt: skip
    from metanet_jax import data

    train_images = jax.device_put(splits["train"])
    val_images = jax.device_put(splits["validation"])
    val_cfg = evaluation.eval_config(
        config, spec.test_ways(), spec.shots, spec.eval_queries_per_class
    )
    sharded = is_sharded(mesh)
    if step_factory is not make_train_step:
        step_fn = step_factory(config, optimizer, validate=False)
    elif sharded:
        step_fn = _cached_sharded_step(config, mesh)
    else:
        step_fn = _cached_train_step(config)
    if sharded:
        state = parallel.replicate(state, mesh)
    start = int(state.step)
    total = spec.steps
    bar = logging_utils.ProgressBar(total, None if parallel.is_primary() else io.StringIO())
    window: dict[str, list[float]] = {}
    t_seg, t_window, steps_window = time.time(), time.time(), 0
    train_time, eval_time = 0.0, 0.0
    last_saved = ckpt.latest_step()

    def meta():
        return dict(meta_base, wall_time_s=wall_before + time.time() - t_start)

    if sharded:
        sample = functools.partial(parallel.sample_process_episodes, mesh=mesh)
    else:
        sample = data.sample_episodes
    for step in range(start, total):
        t0 = time.time()
        step_key = jax.random.fold_in(data_key, step)
        support, query = sample(
            step_key,
            train_images,
            spec.ways,
            spec.shots,
            spec.queries_per_class,
            spec.meta_batch,
            rotate=spec.rotate,
            rotations_as_classes=spec.rotations_as_classes,
        )
        if config.label_units == "any":  # train every output unit, not only the first `ways`
            support, query = data.spread_labels(
                jax.random.fold_in(step_key, 1), support, query, spec.ways, config.output_units
            )
        state, metrics = step_fn(state, support, query)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        train_time += time.time() - t0
        done = step + 1
        if not math.isfinite(metrics["loss"]):
            where = (
                f"the last good checkpoint is step {last_saved} ({ckpt.step_path(last_saved)})"
                if last_saved is not None
                else "no checkpoint was saved yet"
            )
            logging.error(
                "non-finite loss (%s) at step %d; stopping without saving; %s",
                metrics["loss"],
                done,
                where,
            )
            bar.close()
            return {"status": "nan", "step": done, "last_good_step": last_saved}
        for k, v in metrics.items():
            window.setdefault(k, []).append(v)
        steps_window += 1
        bar.update(done, f"loss {metrics['loss']:.2f} acc {metrics['accuracy']:.3f}")
        if done % spec.log_every == 0 or done == total:
            now = time.time()
            avg = {k: float(np.mean(v)) for k, v in window.items()}
            eps = steps_window * spec.meta_batch / max(now - t_window, 1e-9)
            avg["episodes_per_s"] = eps
            # The averages cover the steps of this window run by this process: after a resume
            # in the middle of a window (or at the last step) fewer than --log_every.
            avg["window_steps"] = steps_window
            writer.write(done, avg)
            rate = (done - start) / max(now - t_seg, 1e-9)
            line = logging_utils.progress_line(
                done, total, eps, avg["loss"], avg["accuracy"], (total - done) / rate
            )
            logging.info(line + logging_utils.window_note(steps_window, spec.log_every, done,
                                                          start))  # fmt: skip
            window, t_window, steps_window = {}, now, 0
        validated = None
        if done % spec.eval_every == 0 or done == total:
            t0 = time.time()
            result = evaluation.evaluate(
                _local(state.params),
                val_cfg,
                _eval_batches(val_images, val_cfg, spec.eval_episodes, spec, VALIDATION_SEED),
            )
            eval_time += time.time() - t0
            t_window += time.time() - t0  # episodes/s counts training time only
            validated = result.mean
            writer.write(done, {"validation_accuracy": result.mean, "validation_ci95": result.ci95})
            logging.info("step %d validation %s", done, result.line())
        # Every process stops at the same step (one SIGTERM reaches processes at different
        # times), so that all of them take part in the same checkpoint save.
        stopping = _any_process(stop.signal_name is not None)
        if validated is not None or done % spec.checkpoint_every == 0 or stopping:
            ckpt.save(state, meta(), validation_accuracy=validated)
            last_saved = done
        if stopping and done < total:
            bar.close()
            signal_name = stop.signal_name or "a signal (on another process)"
            logging.warning(
                "%s received: saved the checkpoint of step %d in %s and stopped; run the same "
                "command again to resume",
                signal_name,
                done,
                ckpt.step_path(done),
            )
            return {"status": "interrupted", "step": done, "signal": signal_name}
    bar.close()
    if start >= total:
        logging.info("step %d already reached (--steps=%d): evaluating only", start, total)
    segment_steps = max(total - start, 0)
    if total > start and ckpt.latest_step() != total:
        ckpt.save(state, meta())
    return {
        "status": "completed",
        "segment_steps": segment_steps,
        "episodes_per_s": segment_steps * spec.meta_batch / train_time if train_time else None,
        "train_time_s": train_time,
        "eval_time_s": eval_time,
    }


class _Interrupted(Exception):
    """A signal arrived during the final test (raised between evaluation batches)."""


def _interruptible(batches, stop: StopRequest):
    """`batches`, stopping with `_Interrupted` before the next one once a signal arrived."""
    for batch in batches:
        if stop.signal_name is not None:
            raise _Interrupted
        yield batch
    if stop.signal_name is not None:
        raise _Interrupted


def _interrupted_test(stop: StopRequest, ckpt: checkpointing.Checkpointer) -> dict[str, Any]:
    step = ckpt.latest_step()
    logging.warning(
        "%s received during the final test: stopped it; training is complete (checkpoint of "
        "step %d in %s); run the same command again to test",
        stop.signal_name,
        step,
        ckpt.directory,
    )
    return {"status": "interrupted", "step": step, "signal": stop.signal_name, "phase": "test"}


def _finish(spec, config, splits, ckpt, writer, outcome, t_start, wall_before, mesh, stop):
    # The best good checkpoint: a corrupt one is set aside and the next best used.
    restored = ckpt.restore_best(evaluation.fresh_state(config))
    assert restored is not None  # the loop saved the last step at least
    state, _ = restored
    step = int(state.step)
    test_cfg = evaluation.eval_config(
        config, spec.test_ways(), spec.shots, spec.eval_queries_per_class
    )
    t0 = time.time()
    images = jax.device_put(splits["test"])
    batches = _eval_batches(images, test_cfg, spec.test_episodes, spec, TEST_SEED)
    test = evaluation.evaluate(
        state.params, test_cfg, _interruptible(batches, stop), keep_first=True
    )
    logging.info("test (checkpoint of step %d) %s", step, test.line())
    val = ckpt.validation_accuracy(step)
    workdir = Path(spec.workdir)
    counts = parallel.device_counts(mesh)
    results: dict[str, Any] = {
        "config": spec.to_dict(),
        "model_config": checkpointing.config_to_dict(config),
        "steps": spec.steps,
        "evaluated_step": step,
        "test_ways": test_cfg.ways,
        "best_validation_accuracy": val,
        "test_accuracy": test.mean,
        "test_ci95": test.ci95,
        "test_episodes": test.episodes,
        "devices": counts["devices"],
        "processes": counts["processes"],
        "platform": counts["platform"],
        "versions": logging_utils.library_versions(),
        "episodes_per_s": outcome.get("episodes_per_s"),
    }
    if spec.mnist_test_episodes:
        results.update(_mnist_out_of_domain(spec, config, state.params, stop))
    results["wall_time_s"] = wall_before + time.time() - t_start
    results["test_time_s"] = time.time() - t0
    if not parallel.is_primary():
        return dict(results, status="completed")
    logging_utils.write_results(workdir, results)
    records = logging_utils.read_metrics(workdir / "metrics.jsonl")
    logging_utils.plot_learning_curve(records, workdir / "learning_curve.png")
    support, query, attention = test.first
    logging_utils.plot_attention(
        attention, support.x, support.y, query.x, query.y, workdir / "attention.png"
    )
    writer.write(spec.steps, {"test_accuracy": test.mean})
    return dict(results, status="completed")


def _mnist_out_of_domain(spec: RunSpec, config: MetaNetConfig, params, stop) -> dict[str, Any]:
    from metanet_jax import data

    mnist = data.load_mnist(manual_dir=spec.datasets)
    cfg = evaluation.eval_config(config, 10, 1, spec.eval_queries_per_class)
    images = jax.device_put(mnist["test"].images)
    batches = _eval_batches(images, cfg, spec.mnist_test_episodes, spec, MNIST_SEED)
    result = evaluation.evaluate(params, cfg, _interruptible(batches, stop))
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
