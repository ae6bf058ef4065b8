"""Orbax checkpoints of a MetaNet train state (no pickle, atomic, verified, with a fallback on
corruption).

Layout: `<directory>/<step>/{state,meta,metrics}` written by `orbax.checkpoint`'s
`CheckpointManager`:

* `state`: `{"params", "opt_state", "step", "key"}` through `StandardSave` (tensorstore arrays
  and JSON metadata; nothing executes code on load). Orbax cannot save typed PRNG keys, so
  `key` holds `jax.random.key_data(state.key)` (uint32) and is re-wrapped on restore.
* `meta/metadata`: JSON (`JsonSave`): the model configuration, the step, the cumulative
  training wall time, anything else the caller passes, the validation accuracy when there is
  one, and `integrity`: the sha256 digest of every array of `state` (of its dtype, shape and
  bytes, keyed by its path in the tree) and of the rest of `meta` itself.
* `metrics/metrics`: JSON, only for checkpoints saved right after a validation run:
  `{"validation_accuracy": float}` (the same number as in `meta`).

Preservation policy (orbax `AnyPreservationPolicy`): `LatestN(keep)` keeps the last `keep`
checkpoints and `BestN(n=1, keep_checkpoints_without_metrics=False)` keeps the one with the
highest validation accuracy (ties: the later step). Checkpoints saved without metrics
(periodic, interruption) are kept only while they are among the latest `keep`.

Atomicity: orbax writes into `<step>.orbax-checkpoint-tmp-*` and renames the folder when the
write is complete, so a process killed mid-save leaves a temporary folder that is never listed
as a checkpoint (and is removed by the next save).

Integrity and corruption: a restore checks, before using anything, that `meta` and `metrics`
are JSON matching their digest and each other, that orbax can read every array, and that every
array matches the digest recorded at save (a flipped byte in a data file often still decodes,
into wrong numbers). Any failure makes the checkpoint corrupt (`CorruptCheckpoint`, naming the
file and the cause). `restore_latest` and `restore_best` (the one code path of training, of
`evaluation.load_checkpoint` and of the programs) then fall back to the next candidate:

* a good one is found: one warning line per corrupt checkpoint (its path, the cause and the
  step used instead); a writable `Checkpointer` (training) also sets each corrupt one aside,
  renaming `<step>` to `<step>.corrupt-<reason>` (never deleting it), so that the run can save
  that step again; a read-only one (the loaders) leaves the folder as it is;
* none is good: `CheckpointError`, one line naming every corrupt checkpoint and its cause;
  nothing is renamed (never a silent restart from scratch).

A checkpoint written before digests existed (no `integrity` in `meta`) is not corrupt: it
loads with one warning line saying that its contents could not be verified.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging

from metanet_jax.config import LEGACY_VALUES, MetaNetConfig, legacy_to_current
from metanet_jax.training import TrainState, init_train_state, make_optimizer

VALIDATION_METRIC = "validation_accuracy"
INTEGRITY = "integrity"
DIGEST_ALGORITHM = "sha256"
CORRUPT_MARK = ".corrupt-"

# Where orbax's `JsonSave` puts the JSON items of a checkpoint (read directly, so that a
# garbage file is reported with its path instead of failing inside orbax).
META_FILE = ("meta", "metadata")
METRICS_FILE = ("metrics", "metrics")

# A train state of the right structure, or a function of a checkpoint's metadata returning one.
Like = TrainState | Callable[[dict[str, Any]], TrainState]


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was expected."""


class CorruptCheckpoint(CheckpointError):
    """A listed checkpoint whose contents cannot be read or do not match their digests.

    Attributes:
      path: the checkpoint folder (`<directory>/<step>`).
      step: its step.
      reason: a short tag for the rename (`unreadable`, `digest`, `meta`, `metrics`, `step`).
      cause: one line naming the file and what is wrong with it.
    """

    def __init__(self, path: Path, step: int, reason: str, cause: str):
        self.path, self.step, self.reason, self.cause = Path(path), step, reason, cause
        super().__init__(f"checkpoint {path} is corrupt ({cause})")


# ----------------------------------------------------------------------------- config <-> JSON
def config_to_dict(config: MetaNetConfig) -> dict[str, Any]:
    """A JSON-ready dict of every `MetaNetConfig` field (tuples become lists)."""
    out = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        out[field.name] = list(value) if isinstance(value, tuple) else value
    return out


def config_from_dict(values: Mapping[str, Any]) -> MetaNetConfig:
    """Inverse of `config_to_dict` (unknown keys are an error, lists become tuples)."""
    names = {f.name for f in dataclasses.fields(MetaNetConfig)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"unknown MetaNetConfig fields in a saved config: {unknown}")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
    # A configuration saved before a field existed keeps the behaviour it had then; one saved
    # with a since-removed mode gets the kept mode that computes the same numbers.
    kwargs = legacy_to_current({**LEGACY_VALUES, **kwargs})
    # An execution choice, not the model: a run trained with the fused generator kernels
    # loads wherever they cannot run (an accelerator, a machine without them built).
    if kwargs.get("generator_kernel") == "fused":
        kwargs["generator_kernel"] = "auto"
    return MetaNetConfig(**kwargs)


# ----------------------------------------------------------------------------- state <-> tree
def state_to_tree(state: TrainState) -> dict[str, Any]:
    """A host (numpy) pytree of the train state; the typed key becomes its raw key data."""
    tree = {
        "params": state.params,
        "opt_state": state.opt_state,
        "step": state.step,
        "key": jax.random.key_data(state.key),
    }
    return jax.device_get(tree)


def tree_to_state(tree: Mapping[str, Any], like: TrainState) -> TrainState:
    """Rebuilds a `TrainState` from `state_to_tree` output (the key implementation of `like`)."""
    impl = jax.random.key_impl(like.key)
    return TrainState(
        params=jax.tree.map(jax.numpy.asarray, tree["params"]),
        opt_state=jax.tree.map(jax.numpy.asarray, tree["opt_state"]),
        step=jax.numpy.asarray(tree["step"], jax.numpy.int32),
        key=jax.random.wrap_key_data(jax.numpy.asarray(tree["key"]), impl=impl),
    )


def _abstract(tree):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype), tree)


# ----------------------------------------------------------------------------- digests
def array_digest(x) -> str:
    """sha256 of an array's dtype, shape and bytes (C order), as hex."""
    a = np.ascontiguousarray(np.asarray(x))
    h = hashlib.sha256(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())
    return h.hexdigest()


def tree_digests(tree) -> dict[str, str]:
    """`{path in the tree (jax.tree_util.keystr): array_digest}` of every leaf."""
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(path): array_digest(leaf) for path, leaf in leaves}


def _meta_digest(meta: Mapping[str, Any]) -> str:
    """sha256 of `meta` as canonical JSON, without the digest itself."""
    rest = dict(meta)
    rest[INTEGRITY] = {k: v for k, v in rest[INTEGRITY].items() if k != "meta"}
    text = json.dumps(rest, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


# ----------------------------------------------------------------------------- manager
class Checkpointer:
    """Saves and restores train states in one folder (see the module docstring).

    Args:
      directory: the checkpoint folder (created on the first save unless `read_only`).
      keep: how many of the latest checkpoints to keep (the best one is kept in addition).
      read_only: open for restoring only (never creates, renames, deletes or cleans anything).
    """

    def __init__(self, directory: str | os.PathLike, keep: int = 3, *, read_only: bool = False):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(directory).absolute()
        self.keep = keep
        self.read_only = read_only
        self._reader = ocp.Checkpointer(ocp.CompositeCheckpointHandler())
        # Opened on the first save: orbax's manager reads every checkpoint's metrics when it
        # opens, so corrupt ones must have been set aside by then (see `_writer`).
        self._manager: ocp.CheckpointManager | None = None
        self._unverified: set[int] = set()  # steps without digests already warned about

    # -- queries
    def steps(self) -> list[int]:
        """Steps of the complete checkpoints, ascending (temporary and set-aside folders
        excluded; a corrupt checkpoint not yet found out is listed)."""
        if not self.directory.is_dir():
            return []
        found = ocp.path.step.standard_name_format().find_all(self.directory)
        return sorted(m.step for m in found)

    def latest_step(self) -> int | None:
        steps = self.steps()
        return steps[-1] if steps else None

    def step_path(self, step: int) -> Path:
        return self.directory / str(step)

    def validation_accuracy(self, step: int) -> float | None:
        """The validation accuracy saved with checkpoint `step` (`None`: not validated).

        Raises:
          CorruptCheckpoint: the metrics file is not what was saved.
        """
        return self._metric(step, self.restore_meta(step))

    def best_step(self) -> int | None:
        """The step with the highest validation accuracy (`None` when none has metrics).

        Checkpoints whose metrics cannot be read are not candidates (`restore_best` reports
        them)."""
        ranked, _ = self._ranked()
        return ranked[0] if ranked else None

    def _ranked(self) -> tuple[list[int], list[CorruptCheckpoint]]:
        """Validated steps, best first (ties: the later step), and the corrupt metrics met."""
        scored, corrupt = [], []
        for step in self.steps():
            try:
                value = self._metric(step, None)
            except CorruptCheckpoint as e:
                corrupt.append(e)
                continue
            if value is not None:
                scored.append((value, step))
        return [s for _, s in sorted(scored, reverse=True)], corrupt

    # -- save
    def save(
        self,
        state: TrainState,
        meta: Mapping[str, Any],
        *,
        validation_accuracy: float | None = None,
    ) -> int:
        """Saves `state` at its step (overwriting nothing; an existing step is skipped).

        Args:
          state: the train state (read synchronously: it may be donated afterwards).
          meta: JSON-serialisable metadata (config, wall time, ...).
          validation_accuracy: the validation accuracy of exactly these params, or `None`.

        Returns:
          The step saved.
        """
        if self.read_only:
            raise CheckpointError(f"{self.directory} was opened read-only")
        step = int(state.step)
        manager = self._writer()
        if step in self.steps():
            return step
        tree = state_to_tree(state)
        meta = dict(meta, step=step)
        metrics = None
        if validation_accuracy is not None:
            metrics = {VALIDATION_METRIC: float(validation_accuracy)}
            meta[VALIDATION_METRIC] = float(validation_accuracy)
        meta = json.loads(json.dumps(meta))
        meta[INTEGRITY] = {"algorithm": DIGEST_ALGORITHM, "arrays": tree_digests(tree)}
        meta[INTEGRITY]["meta"] = _meta_digest(meta)
        manager.save(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta)
            ),
            metrics=metrics,
            force=True,
        )
        manager.wait_until_finished()
        return step

    def _writer(self) -> ocp.CheckpointManager:
        """Orbax's manager (saves and the preservation policy), opened once corrupt metrics
        have been set aside: a save means a good state is in hand, so the run can recover."""
        if self._manager is None:
            _, corrupt = self._ranked()
            for e in corrupt:
                logging.warning("%s; %s", e, self._set_aside(e))
            policy = ocp.checkpoint_managers.AnyPreservationPolicy(
                [
                    ocp.checkpoint_managers.LatestN(n=self.keep),
                    ocp.checkpoint_managers.BestN(
                        get_metric_fn=_metric, n=1, keep_checkpoints_without_metrics=False
                    ),
                ]
            )
            options = ocp.CheckpointManagerOptions(
                best_fn=_metric,
                best_mode="max",
                preservation_policy=policy,
                enable_async_checkpointing=False,
                cleanup_tmp_directories=True,
                create=True,
            )
            self._manager = ocp.CheckpointManager(
                self.directory, options=options, item_names=("state", "meta")
            )
        return self._manager

    # -- restore
    def restore_meta(self, step: int) -> dict[str, Any]:
        """The JSON metadata of checkpoint `step`, checked against its digest.

        Raises:
          CorruptCheckpoint: unreadable, not JSON, or not what was saved.
        """
        path = self.step_path(step).joinpath(*META_FILE)
        try:
            meta = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            cause = f"{path}: {type(e).__name__}: {_first_line(e)}"
            raise self._corrupt(step, "meta", cause) from e
        if not isinstance(meta, dict):
            raise self._corrupt(step, "meta", f"{path} holds {type(meta).__name__}, not a dict")
        integrity = meta.get(INTEGRITY)
        if integrity is not None:
            if not isinstance(integrity, dict) or not isinstance(integrity.get("arrays"), dict):
                raise self._corrupt(step, "meta", f"{path}: the integrity record is garbled")
            if integrity.get("meta") != _meta_digest(meta):
                raise self._corrupt(
                    step, "meta", f"{path} differs from the digest recorded at save"
                )
        return meta

    def _metric(self, step: int, meta: Mapping[str, Any] | None) -> float | None:
        """The saved validation accuracy; checked against `meta` when given."""
        path = self.step_path(step).joinpath(*METRICS_FILE)
        recorded = None
        if meta is not None and INTEGRITY in meta:
            recorded = meta.get(VALIDATION_METRIC)
        if not path.exists():
            if recorded is not None:
                raise self._corrupt(step, "metrics", f"{path} is missing")
            return None
        try:
            value = json.loads(path.read_text())[VALIDATION_METRIC]
            value = float(value)
            if not math.isfinite(value):
                raise ValueError(f"{value} is not finite")
        except (OSError, ValueError, KeyError, TypeError) as e:
            cause = f"{path} holds no validation accuracy: {type(e).__name__}: {_first_line(e)}"
            raise self._corrupt(step, "metrics", cause) from e
        if meta is not None and INTEGRITY in meta and value != recorded:
            raise self._corrupt(
                step, "metrics", f"{path} says {value} but the checkpoint recorded {recorded}"
            )
        return value

    def restore(
        self,
        step: int,
        like: Like,
        *,
        warn: Callable[[str], None] = logging.warning,
    ) -> tuple[TrainState, dict[str, Any]]:
        """Restores checkpoint `step` and verifies it (see the module docstring).

        Args:
          step: the checkpoint.
          like: a train state of the right structure, or a function of the checkpoint's
            (verified) metadata returning one.
          warn: called when the checkpoint has no digests (written by an earlier version; once
            per step and `Checkpointer`): it loads unverified.

        Returns:
          `(state, meta)`.

        Raises:
          CorruptCheckpoint: anything unreadable or different from what was saved.
        """
        path = self.step_path(step)
        meta = self.restore_meta(step)
        self._metric(step, meta)
        if callable(like):
            like = like(meta)
        _quiet_closed_event_loops()
        try:
            restored = self._reader.restore(
                path,
                args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(_abstract(state_to_tree(like)))
                ),
            )
        except Exception as e:  # noqa: BLE001 - any failure to read means "unreadable"
            cause = f"{type(e).__name__}: {_first_line(e)}"
            raise self._corrupt(step, "unreadable", cause) from e
        tree = restored["state"]
        self._verify_arrays(step, meta, tree, warn)
        state = tree_to_state(tree, like)
        if int(state.step) != step:
            raise self._corrupt(step, "step", f"{path} holds step {int(state.step)}")
        return state, meta

    def _verify_arrays(self, step: int, meta: dict[str, Any], tree, warn) -> None:
        """Raises `CorruptCheckpoint` when the restored arrays differ from the digests the
        checkpoint recorded at save; one `warn` (per step) when it recorded none."""
        integrity = meta.get(INTEGRITY)
        if integrity is None and step not in self._unverified:
            self._unverified.add(step)
            warn(
                f"checkpoint {self.step_path(step)} has no integrity digests (written by an "
                "earlier version): loaded without verifying its contents"
            )
        elif integrity is not None:
            saved, now = integrity["arrays"], tree_digests(tree)
            bad = sorted(k for k in saved.keys() | now.keys() if saved.get(k) != now.get(k))
            if bad:
                more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
                raise self._corrupt(
                    step,
                    "digest",
                    f"the arrays {', '.join(bad[:3])}{more} differ from the digests recorded "
                    "at save",
                )

    def restore_latest(
        self,
        like: Like,
        *,
        warn: Callable[[str], None] = logging.warning,
        steps: Iterable[int] | None = None,
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The newest good checkpoint, falling back over corrupt ones.

        Args:
          like: as for `restore`.
          warn: called with one line per corrupt checkpoint (its path, the cause, what was
            done with it and the step used instead).
          steps: the candidate steps (default: all, newest first).

        Returns:
          `(state, meta)`, or `None` when the folder holds no checkpoint at all.

        Raises:
          CheckpointError: checkpoints exist but none is good (nothing is renamed).
        """
        steps = sorted(self.steps() if steps is None else steps, reverse=True)
        return self._restore_first(steps, [], like, warn, "the previous checkpoint")

    def restore_best(
        self, like: Like, *, warn: Callable[[str], None] = logging.warning
    ) -> tuple[TrainState, dict[str, Any]] | None:
        """The good checkpoint with the highest validation accuracy (then the others, newest
        first, when no validated one is good); corrupt ones as in `restore_latest`."""
        ranked, corrupt = self._ranked()
        bad = {e.step for e in corrupt}
        rest = [s for s in sorted(self.steps(), reverse=True) if s not in ranked and s not in bad]
        return self._restore_first(ranked + rest, corrupt, like, warn, "the next best checkpoint")

    def _restore_first(self, steps, corrupt, like, warn, what):
        corrupt = list(corrupt)
        for step in steps:
            try:
                state, meta = self.restore(step, like, warn=warn)
            except CorruptCheckpoint as e:
                corrupt.append(e)
                continue
            for e in corrupt:
                warn(f"{e}; {self._set_aside(e)}; falling back to {what}, step {step}")
            return state, meta
        if not corrupt:
            return None
        refuse = "" if self.read_only else (
            "; refusing to start again from scratch (move the folder away to do that)"
        )  # fmt: skip
        raise CheckpointError(
            f"none of the {len(corrupt)} checkpoints in {self.directory} is good{refuse}: "
            + " | ".join(str(e) for e in corrupt)
        )

    def _corrupt(self, step: int, reason: str, cause: str) -> CorruptCheckpoint:
        return CorruptCheckpoint(self.step_path(step), step, reason, " ".join(cause.split()))

    def _set_aside(self, e: CorruptCheckpoint) -> str:
        """Renames a corrupt checkpoint out of the listing (writable only); says what it did."""
        if self.read_only:
            return "left in place (opened read-only)"
        target = e.path.with_name(f"{e.step}{CORRUPT_MARK}{e.reason}")
        n = 1
        while target.exists():
            n += 1
            target = e.path.with_name(f"{e.step}{CORRUPT_MARK}{e.reason}-{n}")
        _sync("metanet_jax.checkpointing:set_aside:before")
        if jax.process_index() == 0:
            os.replace(e.path, target)
        _sync("metanet_jax.checkpointing:set_aside:after")
        if self._manager is not None:
            self._manager.reload()
        return f"set aside as {target.name}"

    def close(self) -> None:
        if self._manager is not None:
            self._manager.close()
        self._reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _metric(metrics: Mapping[str, Any]) -> float:
    return float(metrics[VALIDATION_METRIC])


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


_QUIETED = False


def _quiet_closed_event_loops() -> None:
    """Drops the "Event loop is closed" reports of a failed restore (nothing else).

    When orbax cannot read one array it returns the error at once and closes its event loop;
    tensorstore's reads of the other arrays still complete afterwards, and each one's
    callback fails on the closed loop and is reported through `sys.unraisablehook`: hundreds
    of tracebacks after a one-line error, none of them telling anything. Other unraisable
    exceptions go to the previous hook.
    """
    global _QUIETED
    if _QUIETED:
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        exc = unraisable.exc_value
        tb = unraisable.exc_traceback
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        in_asyncio = tb is not None and "asyncio" in tb.tb_frame.f_code.co_filename
        if isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed" and in_asyncio:
            return
        previous(unraisable)

    sys.unraisablehook = hook
    _QUIETED = True


# ----------------------------------------------------------------------------- a run's layout
CHECKPOINT_SUBDIR = "checkpoints"


def checkpoint_dir(workdir: str | os.PathLike) -> Path:
    """Where a run keeps its checkpoints: `<workdir>/checkpoints`."""
    return Path(workdir) / CHECKPOINT_SUBDIR


def fresh_state(config: MetaNetConfig, seed: int = 0) -> TrainState:
    """A freshly initialised train state for `config` (the structure to restore into)."""
    from metanet_jax.model.episode import init

    key = jax.random.key(seed)
    params = init(jax.random.fold_in(key, 0), config)
    return init_train_state(params, make_optimizer(config), jax.random.fold_in(key, 1))


def load_run(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[MetaNetConfig, Any, dict[str, Any]]:
    """`(config, params, meta)` of a training run's checkpoint (`metanet_jax.load` also reads
    pretrained folders).

    Corruption is handled as in training (`Checkpointer.restore_best` / `restore_latest`): a
    corrupt checkpoint is reported in one warning line (its path and the cause) and the next
    candidate is used; the workdir is only read (nothing renamed).

    Args:
      workdir: the run's folder (the one passed as `--workdir`).
      which: "best" (highest validation accuracy, falling back to the next best; the latest
        if none was validated) or "latest" (the newest good checkpoint).

    Returns:
      The model configuration, the parameters and the checkpoint's metadata (step, wall
      time, flags, ...).

    Raises:
      FileNotFoundError: no checkpoint in `workdir`.
      CheckpointError: no good checkpoint (one line naming each and its cause).
    """
    if which not in ("best", "latest"):
        raise ValueError(f"which must be 'best' or 'latest', got {which!r}")
    directory = checkpoint_dir(workdir)
    if not directory.is_dir():
        raise FileNotFoundError(f"no checkpoints in {workdir} (expected {directory})")
    states: dict[str, Any] = {}

    def like(meta):  # one freshly initialised structure per saved configuration
        if not isinstance(meta.get("model_config"), dict):
            raise CheckpointError(
                f"checkpoint {meta.get('step')} in {directory} has no model configuration"
            )
        key = json.dumps(meta["model_config"], sort_keys=True)
        if key not in states:
            states[key] = fresh_state(config_from_dict(meta["model_config"]))
        return states[key]

    with Checkpointer(directory, read_only=True) as ckpt:
        restored = ckpt.restore_best(like) if which == "best" else ckpt.restore_latest(like)
    if restored is None:
        raise FileNotFoundError(f"no complete checkpoint in {directory}")
    state, meta = restored
    return config_from_dict(meta["model_config"]), state.params, meta
