"""A run folder's `config.json`: what `experiments.train` checks before it resumes a workdir
and writes when it starts one.

A later run on a workdir must agree with its `config.json` on every flag outside
`train.MUTABLE_FIELDS` (`check_workdir`; flags added since count as what the code did before
them, `saved_flags`) and, for Mini-ImageNet, on the checksums of the split files
(`data_record`, `check_data_record`). `experiments.train` keeps these names.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metanet_jax import checkpointing, logging_utils
from metanet_jax.config import MetaNetConfig, legacy_to_current

if TYPE_CHECKING:
    from experiments.schema import RunSpec


class WorkdirMismatch(ValueError):
    """The workdir was created by a run with different model or data flags."""


class WorkdirError(ValueError):
    """The workdir cannot be created or written (names the path and the system's reason)."""


def json_value(value: Any) -> Any:
    """A flag value read from config.json as the spec holds it: JSON has no tuples, so an
    integer-list flag (a tuple in the spec, e.g. `train_ways`) comes back as a list."""
    return tuple(value) if isinstance(value, list) else value


def saved_flags(flags: Mapping[str, Any]) -> dict[str, Any]:
    """A run's saved flags (config.json's `"flags"`) as the flat flags of a `RunSpec`
    (`RunSpec.from_flags`).

    A field added after the run was saved counts as what the run did before the field
    existed: its `LEGACY_RUN_VALUES` entry where it has one, else its default. Fields this
    version does not know are dropped; a since-removed mode becomes the kept one that
    computes the same numbers (`config.legacy_to_current`).
    """
    from experiments.schema import LEGACY_RUN_VALUES, RunSpec

    values = RunSpec(workdir="").to_dict()
    names = set(values)
    del values["workdir"]  # required: no default
    values.update(LEGACY_RUN_VALUES)
    values.update({k: json_value(v) for k, v in flags.items() if k in names})
    return legacy_to_current(values)


def changed_flags(was: Mapping[str, Any], now: Mapping[str, Any], ignored=()) -> list[str]:
    """`"name (old -> new)"` for each flag of `now` outside `ignored` whose value differs
    from `was` (a saved config.json's), sorted by name: what a resume check refuses."""
    return [
        f"{k} ({was.get(k)!r} -> {v!r})"
        for k, v in sorted(now.items())
        if k not in ignored and was.get(k) != v
    ]


def check_workdir(spec: RunSpec) -> dict[str, Any] | None:
    """Compares `spec` with an existing workdir's `config.json` (reads only).

    Returns:
      The saved config, or `None` when the workdir has none yet.

    Raises:
      WorkdirMismatch: a model or data field differs; the message names each one.
    """
    from experiments.schema import MUTABLE_FIELDS

    path = Path(spec.workdir) / "config.json"
    if not path.exists():
        return None
    saved = json.loads(path.read_text())
    was = saved_flags(saved.get("flags", {}))
    now = spec.to_dict()
    ignored = set(MUTABLE_FIELDS)
    if not spec.model.resolved("batchnorm_layers"):
        ignored.add("bn_statistics")  # no BatchNorm layer: the same model either way
    diffs = changed_flags(was, now, ignored)
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
    if spec.data.dataset != "mini_imagenet":
        return None
    from metanet_jax.data import mini_imagenet

    sums = {
        s: mini_imagenet.split_info(spec.data.mini_imagenet_dir, s)["sha256"]
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
