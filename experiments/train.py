"""The training run behind `experiments/omniglot.py`: `train_and_evaluate(spec)` trains (or
resumes) a run, then tests its best checkpoint and writes its results.

The run is a `RunSpec` (`experiments.schema`: every flag, grouped as `data`, `model`,
`optim` and `schedule`); its data and evaluation episodes come from `experiments.run_data`, its
config.json checks from `experiments.workdir`, its loop from the library (`metanet_jax.runtime`:
the train step of `make_step`, compiled ahead of time, the episodes of `episode_source`, logs,
validation and checkpoints at the spec's `Cadence`), its records from `experiments.records`.
The names that used to live here (`RunSpec`, `MODEL_FLAGS`, `load_splits`, `Loop`, `run_loop`,
`StopRequest`, `jitted_train_step`, ...) are still importable from this module.

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
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from experiments import records, run_data, schema, workdir
from experiments.schema import RunSpec
from metanet_jax import checkpointing, evaluation, kernels, logging_utils, parallel, runtime
from metanet_jax.config import MetaNetConfig
from metanet_jax.model.episode import init
from metanet_jax.training import TrainState, init_train_state, make_optimizer, make_train_step

# ----------------------------------------------------------------------------- the run
# Names that moved to experiments.schema (the run's flags), run_data (its data), workdir (its
# config.json) and metanet_jax.runtime / parallel (the library's loop), still importable from
# here (PEP 562).
_MOVED = {
    **dict.fromkeys(
        "VALIDATION_SEED TEST_SEED MNIST_SEED DATASETS MUTABLE_FIELDS LEGACY_RUN_VALUES "
        "MODEL_FLAGS".split(),
        schema,
    ),
    **dict.fromkeys("load_splits model_config environment_summary".split(), run_data),
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
        return _eval_config(self.spec, self.config)

    def loop_context(self) -> runtime.LoopContext:
        """The run as its training loop sees it (`runtime.train`)."""
        spec, proto = self.spec, self.spec.eval_protocol("validation")
        images = jax.device_put(self.splits["validation"])

        def validate(params):
            return evaluation.measure(params, self.config, images, proto)

        schedule = spec.schedule
        cadence = runtime.Cadence(
            spec.optim.steps,
            schedule.log_every,
            schedule.eval_every,
            schedule.checkpoint_every,
            spec.optim.meta_batch,
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
    parallel.check_meta_batch(spec.optim.meta_batch, mesh)  # before any work
    logging.info(parallel.device_summary(mesh, spec.optim.meta_batch))
    logging.info(kernels.describe(spec.model))  # ValueError: "fused" where it cannot run
    # The step's programs compile while the data loads (the data's image shape is known
    # from the spec): preparing the data the first time takes longer than compiling.
    shape = run_data.image_shape(spec) if splits is None else tuple(splits["train"].shape[2:])
    step_fn = _make_step(spec, run_data.model_config(spec, shape), mesh, step_factory)
    compilations = _compile_ahead(spec, step_fn)
    try:
        splits = run_data.load_data(spec) if splits is None else splits
        run, state = _start_run(spec, splits, mesh, t_start)
        if run.config != step_fn.config:
            raise ValueError(
                f"the data's images are {run.config.image_shape}, not "
                f"{step_fn.config.image_shape} as run_data.image_shape said"
            )
    except BaseException:
        if compilations is not None:
            compilations.close()
        raise
    try:
        loop = _start_loop(run, state, step_fn, compilations)
        outcome = runtime.train(loop, run.loop_context())
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
        checkpointing.checkpoint_dir(spec.workdir), keep=spec.schedule.keep_checkpoints
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


def _prepare_workdir(spec: RunSpec, splits: Mapping[str, np.ndarray]) -> MetaNetConfig:
    """Checks the sizes, the workdir's config.json and data record (refusing before writing
    anything), then writes config.json (process 0). Returns the run's model configuration."""
    config = run_data.model_config(spec, tuple(splits["train"].shape[2:]))
    schema.check_pools(spec, splits)
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
    state = _fresh_state(spec, config)
    restored = ckpt.restore_latest(state)
    if restored is None:
        logging.info("starting a new run in %s", spec.workdir)
        return state, 0.0
    state, meta = restored
    logging.info("resumed from step %d (%s)", int(state.step), ckpt.step_path(int(state.step)))
    return state, float(meta.get("wall_time_s", 0.0))


def _make_step(spec: RunSpec, config: MetaNetConfig, mesh, step_factory: Callable):
    """The run's train step (`runtime.make_step`) for every ways of `spec.train_ways`."""
    make = None
    if step_factory is not make_train_step:  # used as given, also on several devices

        def make(config):
            return step_factory(config, make_optimizer(config), validate=False)

    return runtime.make_step(config, ways=spec.train_ways, mesh=mesh, make=make)


def _start_loop(
    run: _Run, state: TrainState, step_fn: runtime.TrainStep, compilations
) -> runtime.TrainingLoop:
    """The run's loop from the state's step: its train step (`_make_step`, compiling ahead of
    time into `compilations`), its episodes and its progress bar."""
    from metanet_jax import data

    spec, sharded = run.spec, parallel.is_sharded(run.mesh)
    start = int(state.step)
    if compilations is not None and start >= spec.optim.steps:
        compilations.close()  # nothing to train: drop what has not started compiling
        compilations = None
    if sharded:
        state = parallel.replicate(state, run.mesh)
        sample = functools.partial(parallel.sample_process_episodes, mesh=run.mesh)
    else:
        sample = data.sample_episodes
    episodes = runtime.episode_source(
        sample,
        jax.random.fold_in(jax.random.key(spec.optim.seed), 2),
        jax.device_put(run.splits["train"]),
        run.config,
        spec.optim.meta_batch,
        spec.step_ways,
        rotate=spec.data.rotate,
        rotations_as_classes=spec.data.rotations_as_classes,
        translate=spec.data.translate,
    )
    out = None if parallel.is_primary() else io.StringIO()
    return runtime.TrainingLoop(
        state=state,
        step_fn=step_fn,
        episodes=episodes,
        start=start,
        bar=logging_utils.ProgressBar(spec.optim.steps, out),
        last_saved=run.ckpt.latest_step(),
        compilations=compilations,
    )


def _eval_config(spec: RunSpec, config: MetaNetConfig) -> MetaNetConfig:
    """The model configuration of the run's validation and test episodes."""
    return evaluation.eval_config(
        config, spec.test_ways(), spec.model.shots, spec.eval_queries_per_class
    )


def _fresh_state(spec: RunSpec, config: MetaNetConfig) -> TrainState:
    """The run's train state at step 0 (from its seed)."""
    root = jax.random.key(spec.optim.seed)
    params = init(jax.random.fold_in(root, 0), config)
    return init_train_state(params, make_optimizer(config), jax.random.fold_in(root, 1))


def _abstract_state(spec: RunSpec, config: MetaNetConfig):
    """The shapes and dtypes of the run's train state, computing nothing."""
    return runtime.steps.abstract(jax.eval_shape(lambda: _fresh_state(spec, config)))


def _compile_ahead(spec: RunSpec, step_fn: runtime.TrainStep):
    """Starts compiling the training step of every ways (step 0's first), then the
    validation step, on threads (`runtime.steps`; the loop waits for each before its first
    use). Not in a run of several processes (each would compile on its own schedule).

    Returns:
      The `runtime.Compilations`, or `None`.
    """
    if jax.process_count() > 1:
        return None
    state = _abstract_state(spec, step_fn.config)
    compilations = step_fn.compile(state, spec.optim.meta_batch, first=spec.step_ways(0))
    if compilations is not None:
        cfg = _eval_config(spec, step_fn.config)
        batch = min(spec.schedule.eval_batch, spec.schedule.eval_episodes)
        support, query = runtime.steps.episode_shapes(cfg, cfg.ways, batch)
        fn = evaluation._episode_loss(cfg)
        programs = runtime.steps.programs(fn, state.params, support, query)
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
    restored = run.ckpt.restore_best(checkpointing.fresh_state(config))
    assert restored is not None  # the loop saved the last step at least
    state, _ = restored
    step = int(state.step)
    t0 = time.time()
    images = jax.device_put(run.splits["test"])
    test = evaluation.measure(
        state.params, config, images, spec.eval_protocol("test"), stop=run.stop, keep_first=True
    )
    logging.info("test (checkpoint of step %d) %s", step, test.line())
    counts = parallel.device_counts(run.mesh)
    mnist = {}
    if spec.schedule.mnist_test_episodes:
        mnist = run_data.mnist_out_of_domain(spec, config, state.params, run.stop)
    # results.json (experiments.records): every field given is written, null included.
    results = records.RunResults.written(
        config=spec.to_dict(),
        model_config=checkpointing.config_to_dict(config),
        steps=spec.optim.steps,
        evaluated_step=step,
        test_ways=spec.test_ways(),
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
    run.writer.write(run.spec.optim.steps, {"test_accuracy": test.mean})
