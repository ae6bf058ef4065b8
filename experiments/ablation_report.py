"""The report's ablation tables (`experiments.reporting`: docs/RESULTS.md's "Ablations").

Ablation files (`docs/ablations/<name>.json`), in either of two formats:

* as `python -m experiments.ablation` writes them: `{"name", "description", "base_flagfile",
  "common_flags", "command", "rows": [{"name", "description", "flags": [...], "steps",
  "wall_time_s", "episodes_per_s", "best_validation_accuracy", "best_validation_ci95",
  "best_validation_step", "final_validation_accuracy", "final_validation_ci95",
  "validation_episodes", "test_accuracy_record_only", "test_episodes", ...}]}`;
* a simple one (`write_ablation`): `{"title", "description", "command", "hardware",
  "rows": [{"name", "description", "flags": "--x=1", "steps", "wall_time_s",
  "val_accuracy", "val_ci95", "val_episodes", "test_accuracy", "test_ci95",
  "test_episodes"}]}`.

Each row needs `name`, `steps`, `wall_time_s` and a validation accuracy; accuracies are
fractions in [0, 1]. Both read into the same record (`experiments.records.AblationTable`)
and render as one table under "Ablations".
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import report_markdown as md
from experiments.records import AblationTable, EvalRecord, read_json

# The simple format's row fields (`write_ablation` refuses any other).
_ABLATION_REQUIRED = ("name", "flags", "steps", "wall_time_s", "val_accuracy", "val_ci95")
_ABLATION_OPTIONAL = ("description", "val_episodes", "test_accuracy", "test_ci95",
                      "test_episodes")  # fmt: skip


def check_ablation(value: Mapping[str, Any], where: str = "ablation") -> None:
    """Raises ValueError (one line naming `where`, the row and the field) unless `value` is
    an ablation table in one of the two formats of the module docstring."""
    AblationTable.from_json(value, where)


def write_ablation(
    path: str | os.PathLike,
    title: str,
    rows: Sequence[Mapping[str, Any]],
    *,
    description: str | None = None,
    command: str | None = None,
    hardware: str | None = None,
) -> Path:
    """Writes an ablation table in the simple format (checked with `check_ablation`)."""
    from metanet_jax.logging_utils import write_json_atomic

    value: dict[str, Any] = {"title": title, "rows": [dict(r) for r in rows]}
    for k, v in (("description", description), ("command", command), ("hardware", hardware)):
        if v is not None:
            value[k] = v
    table = AblationTable.from_json(value, str(path))
    unknown = sorted({k for r in rows for k in r} - set(_ABLATION_REQUIRED) -
                     set(_ABLATION_OPTIONAL))  # fmt: skip
    if unknown:
        raise ValueError(f"{path}: unknown row field(s) {', '.join(unknown)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, table.to_json())
    return Path(path)


def _flags_text(flags: Any) -> str:
    if isinstance(flags, (list, tuple)):
        flags = " ".join(str(f) for f in flags)
    return md.code(str(flags)) if flags else ""


def ablation_section(path: Path) -> list[str]:
    """The section of one ablation file: its heading, notes and table.

    Raises:
      ValueError: the file is unreadable or not an ablation table (one line).
    """
    value = AblationTable.from_json(read_json(path), str(path))
    out = [f"### {value.heading}", ""]
    if value.description:
        out += [str(value.description), ""]
    notes = []
    if value.base_flagfile:
        common = " ".join(value.common_flags or [])
        notes.append(f"Every run: `{value.base_flagfile}`" + (f" with `{common}`." if common
                                                               else "."))  # fmt: skip
    if value.command:
        notes.append(f"Command: `{value.command}`.")
    if value.hardware:
        notes.append(f"Hardware: {value.hardware}.")
    notes.append(f"Source: `{md.display(path)}`.")
    out += [" ".join(notes), ""]
    header = ["candidate", "flags", "steps", "wall time", "episodes/s",
              "validation (95% CI)", "best at step", "final validation", "val. episodes",
              "test (record only)", "test episodes", "what"]  # fmt: skip
    # Validation at more ways (experiments.ablation's `eval_ways`): a column for each.
    more_ways = sorted({int(k) for r in value.rows for k in r.validation_by_ways or {}})
    header[6:6] = [f"validation {k}-way" for k in more_ways]
    lines = []
    for r in value.rows:
        by_ways = r.validation_by_ways or {}
        at_ways = [EvalRecord.from_json(by_ways.get(str(k), {}), f"{path}: {r.name} {k}-way")
                   for k in more_ways]  # fmt: skip
        eps = r.episodes_per_s
        lines.append([
            str(r.name), _flags_text(r.flags), md.count(r.steps), md.duration(r.wall_time_s),
            "" if eps is None else f"{eps:.2f}", md.pct(r.validation_accuracy, r.validation_ci95),
            *(md.pct(v.accuracy, v.ci95) for v in at_ways), md.count(r.best_validation_step),
            md.pct(r.final_validation_accuracy, r.final_validation_ci95),
            md.count(r.validation_episodes), md.pct(r.test_accuracy, r.test_ci95),
            md.count(r.test_episodes), str(r.description or ""),
        ])  # fmt: skip
    return out + md.table(header, lines) + [""]


def ablations(folder: Path | None) -> list[str]:
    """The "Ablations" section: one table per `folder/*.json`, by file name."""
    files = sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []
    out = ["## Ablations", ""]
    if not files:
        where = md.display(folder) if folder is not None else "docs/ablations"
        return out + [f"None yet (`{where}/*.json`: `python -m experiments.ablation`).", ""]
    for f in files:
        out += ablation_section(f)
    return out
