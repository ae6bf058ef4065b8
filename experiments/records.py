"""The run records the programs write and the report reads, as small frozen dataclasses.

* `RunResults`: a `results.json`, of a training run (`experiments.train`, at its end) or of a
  pretrained model (`experiments.exporting`);
* `EvalRecord`: an `eval_<name>.json` (`experiments.evaluate`; `experiments.ablation`'s
  `eval_validation_<K>way.json` too);
* `AblationTable` of `AblationRow`s: a `docs/ablations/<name>.json`, in either of its two
  formats (`experiments.ablation_report`'s docstring): both read into the same fields.

The files' names and keys are read by tools outside the package (`results.json`: its flat
`config` map of flags and the top-level `test_accuracy`, `test_ci95`, `test_episodes`,
`wall_time_s`; `eval_*.json`: `accuracy`, `ci95`, `episodes`), so a record keeps a file as
it was written: `Record.from_json(d).to_json() == d`. Keys a record does not name are kept in
its `extra` mapping, a key written as null is written as null again (`nulls`), and an ablation
row remembers which format named each of its fields (`keys`). A field is None where the file
lacks it or holds null; `from_json` refuses a number field holding something else in one line
(`ValueError` naming the file and the key). Values are kept as read (no conversion), so
numbers keep their JSON form.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

R = TypeVar("R", bound="_Record")

# The fields every record has besides the file's keys.
_BOOKKEEPING = frozenset({"extra", "nulls", "keys"})


def read_json(path: str | Path) -> dict[str, Any]:
    """The JSON object in `path`.

    Raises:
      ValueError: unreadable, not JSON, or not an object (one line naming the file).
    """
    path = Path(path)
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Record:
    """What every record shares: the keys it does not name, and its explicit nulls."""

    # The file's keys this record does not name, as read (written back unchanged).
    extra: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    # The fields written as JSON null while None (else a None field is left out of the file).
    nulls: frozenset[str] = frozenset()

    @classmethod
    def _fields(cls) -> list[dataclasses.Field]:
        return [f for f in dataclasses.fields(cls) if f.name not in _BOOKKEEPING]

    @classmethod
    def _read_keys(cls, name: str) -> tuple[str, ...]:
        """The JSON keys a field is read from, the first present winning."""
        return (name,)

    def _json_key(self, name: str) -> str:
        """The JSON key a field is written to."""
        return name

    @classmethod
    def written(cls: type[R], **values: Any) -> R:
        """A record whose every given field is written, None as null: what a program builds
        for a file that always holds those keys."""
        return cls(**values, nulls=frozenset(k for k, v in values.items() if v is None))

    @classmethod
    def from_json(cls: type[R], value: Mapping[str, Any], where: str = "record") -> R:
        """The record of a JSON object as read (`where` names it in errors).

        Raises:
          ValueError: not an object, or a number field holding something else.
        """
        if not isinstance(value, Mapping):
            raise ValueError(f"{where}: expected a JSON object")
        rest = dict(value)
        fields: dict[str, Any] = {}
        keys: dict[str, str] = {}
        for f in cls._fields():
            key = next((k for k in cls._read_keys(f.name) if k in rest), None)
            if key is None:
                continue
            fields[f.name] = v = rest.pop(key)
            keys[f.name] = key
            # (The annotations are strings here: `from __future__ import annotations`.)
            if v is not None and f.type.startswith(("int", "float")):
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{where}: {key}={v!r} is not a number")
        nulls = frozenset(k for k, v in fields.items() if v is None)
        return cls._build(fields, keys, extra=rest, nulls=nulls)

    @classmethod
    def _build(cls: type[R], fields: dict[str, Any], keys: dict[str, str], **more: Any) -> R:
        return cls(**fields, **more)

    def to_json(self) -> dict[str, Any]:
        """The JSON object of the record (`from_json`'s input for a record read)."""
        out = {}
        for f in self._fields():
            value = getattr(self, f.name)
            if value is not None or f.name in self.nulls:
                out[self._json_key(f.name)] = value
        return {**out, **self.extra}


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunResults(_Record):
    """A `results.json`: the run's flags and its test, as training or an export wrote it."""

    config: Mapping[str, Any] | None = None  # every flag of the run, flat (RunSpec.to_dict)
    model_config: Mapping[str, Any] | None = None  # the MetaNetConfig, as a dict
    name: str | None = None  # a pretrained model's folder name
    steps: int | None = None  # parameter updates the run was given
    evaluated_step: int | None = None  # the checkpoint tested
    test_accuracy: float | None = None  # a fraction, mean over the test episodes
    test_ci95: float | None = None
    test_episodes: int | None = None
    test_ways: int | None = None
    test_protocol: Mapping[str, Any] | None = None  # experiments.protocol.protocol()
    test_platform: str | None = None  # where an export measured the test
    test_time_s: float | None = None
    best_validation_accuracy: float | None = None
    validation_curve: Sequence[Sequence[float]] | None = None  # [[step, accuracy, wall s]]
    mnist_accuracy: float | None = None  # 10-way 1-shot out of domain (--mnist_test_episodes)
    mnist_ci95: float | None = None
    mnist_episodes: int | None = None
    wall_time_s: float | None = None  # training's, resumed runs summed
    episodes_per_s: float | None = None
    platform: str | None = None  # JAX's backend of the training
    devices: int | None = None
    processes: int | None = None
    hardware: str | None = None  # in words, given at export (--hardware)
    flagfile: str | None = None  # experiments/flags/<name>.flags the run was trained with
    command: str | None = None  # the command that trains it again
    training_run: Mapping[str, Any] | None = None  # an export's: what the run measured
    params: Mapping[str, Any] | None = None  # an export's params.npz: file, count, bytes, sha
    versions: Mapping[str, str] | None = None  # library versions


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvalRecord(_Record):
    """An `eval_<name>.json`: one evaluation of a trained model by `experiments.evaluate`."""

    accuracy: float | None = None  # a fraction, mean over the episodes
    ci95: float | None = None
    episodes: int | None = None
    data: str | None = None  # "omniglot/<split>/<subset>", "mnist/test", ...
    lake_runs_dir: str | None = None  # Lake's runs instead of `data`
    ways: int | None = None
    shots: int | None = None
    queries_per_class: int | None = None
    seed: int | None = None
    batch: int | None = None
    checkpoint: str | None = None  # "best", "latest" or "pretrained"
    checkpoint_step: int | None = None
    protocol: Mapping[str, Any] | None = None  # experiments.protocol.protocol(), as used
    trained: Mapping[str, Any] | None = None  # the model's training setting
    versions: Mapping[str, str] | None = None


# An ablation row's fields the two formats name differently: (the simple format's key,
# experiments.ablation's key).
_ROW_ALIASES = {
    "validation_accuracy": ("val_accuracy", "best_validation_accuracy"),
    "validation_ci95": ("val_ci95", "best_validation_ci95"),
    "validation_episodes": ("val_episodes", "validation_episodes"),
    "test_accuracy": ("test_accuracy", "test_accuracy_record_only"),
}
# The keys of an ablation row that must hold fractions in [0, 1] (either format).
ROW_FRACTIONS = ("val_accuracy", "val_ci95", "best_validation_accuracy", "best_validation_ci95",
                 "final_validation_accuracy", "final_validation_ci95", "test_accuracy",
                 "test_ci95", "test_accuracy_record_only")  # fmt: skip


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblationRow(_Record):
    """One candidate of an ablation table, in either format (fields named as the simple
    format's, less its `val_` abbreviation)."""

    name: str
    steps: int
    wall_time_s: float
    validation_accuracy: float  # the best validation's (experiments.ablation)
    validation_ci95: float | None = None
    validation_episodes: int | None = None
    description: str | None = None
    flags: str | Sequence[str] | None = None  # "--x=1 --y=2" or ["--x=1", "--y=2"]
    episodes_per_s: float | None = None
    best_validation_step: int | None = None
    final_validation_accuracy: float | None = None
    final_validation_ci95: float | None = None
    validation_curve: Sequence[Sequence[float]] | None = None  # [[step, accuracy]]
    validation_by_ways: Mapping[str, Mapping[str, Any]] | None = None  # {"20": EvalRecord}
    test_accuracy: float | None = None  # for the record only (models are chosen on validation)
    test_ci95: float | None = None
    test_episodes: int | None = None
    # The JSON key of each field named differently by the formats (absent: the simple one's).
    keys: Mapping[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def _read_keys(cls, name: str) -> tuple[str, ...]:
        return _ROW_ALIASES.get(name, (name,))

    def _json_key(self, name: str) -> str:
        return self.keys.get(name) or _ROW_ALIASES.get(name, (name,))[0]

    @classmethod
    def from_json(cls, value: Mapping[str, Any], where: str = "row") -> AblationRow:
        """The row as read.

        Raises:
          ValueError: a required field missing or null, an accuracy that is not a fraction in
            [0, 1] (one line naming `where`, the row and the key), or `_Record.from_json`'s.
        """
        if isinstance(value, Mapping):
            missing = [k for k in ("name", "steps", "wall_time_s") if value.get(k) is None]
            if value.get("val_accuracy") is None and value.get("best_validation_accuracy") is None:
                missing.append("val_accuracy (or best_validation_accuracy)")
            if missing:
                raise ValueError(f"{where} ({value.get('name')!r}) lacks {', '.join(missing)}")
            for k in ROW_FRACTIONS:
                v = value.get(k)
                if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                    raise ValueError(f"{where} {k}={v!r} is not a fraction in [0, 1]")
        return super().from_json(value, where)

    @classmethod
    def _build(cls, fields: dict[str, Any], keys: dict[str, str], **more: Any) -> AblationRow:
        renamed = {k: v for k, v in keys.items() if k in _ROW_ALIASES and v != _ROW_ALIASES[k][0]}
        return cls(**fields, keys=renamed, **more)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AblationTable(_Record):
    """A `docs/ablations/<name>.json`: a heading, notes, and its rows."""

    rows: Sequence[AblationRow]
    title: str | None = None  # the simple format's heading
    name: str | None = None  # experiments.ablation's plan name (the heading without a title)
    description: str | None = None
    base_flagfile: str | None = None  # experiments.ablation: every run's flagfile ...
    common_flags: Sequence[str] | None = None  # ... and the flags every run adds to it
    command: str | None = None
    hardware: str | None = None

    @property
    def heading(self) -> str:
        return self.title or self.name or ""

    @classmethod
    def from_json(cls, value: Mapping[str, Any], where: str = "ablation") -> AblationTable:
        """The table as read (`where` names it in errors).

        Raises:
          ValueError: no string title (or name), no rows, or a bad row (one line).
        """
        heading = value.get("title", value.get("name")) if isinstance(value, Mapping) else None
        if not isinstance(heading, str):
            raise ValueError(f"{where}: needs a string 'title' (or 'name')")
        rows = value.get("rows")
        if not isinstance(rows, list) or not rows:
            raise ValueError(f"{where}: needs a non-empty list 'rows'")
        for i, row in enumerate(rows):
            if not isinstance(row, Mapping):
                raise ValueError(f"{where}: row {i} is not an object")
        parsed = tuple(AblationRow.from_json(r, f"{where}: row {i}") for i, r in enumerate(rows))
        return super().from_json({**value, "rows": parsed}, where)

    def to_json(self) -> dict[str, Any]:
        return {**super().to_json(), "rows": [r.to_json() for r in self.rows]}
