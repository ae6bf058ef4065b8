"""What the report (`experiments.reporting`) reads: the folders holding results (`Source`: a
run folder or a pretrained model, its `results.json` and `eval_*.json` as records) and every
test accuracy in them (`Measurement`), each with the command that measures it again."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from experiments.records import EvalRecord, RunResults, read_json
from experiments.report_markdown import display


@dataclasses.dataclass
class Source:
    """One folder with results: a training run or a pretrained model."""

    path: str  # as displayed (relative to the working folder when inside it)
    pretrained: bool
    results: RunResults  # empty (`RunResults()`) without a results.json
    flags: dict[str, Any]
    evals: dict[str, EvalRecord]  # by file name (`eval_<name>.json`), sorted

    @property
    def name(self) -> str:
        return self.results.name or Path(self.path).name

    def flag(self, key: str, default: Any = None) -> Any:
        value = self.flags.get(key)
        return default if value is None else value


@dataclasses.dataclass
class Measurement:
    """One accuracy: a source's own test (results.json) or one of its `eval_*.json`."""

    source: Source
    dataset: str
    split: str | None
    ways: int
    shots: int
    accuracy: float
    ci95: float | None
    episodes: int | None
    command: str
    origin: str


def find_sources(folders: Iterable[str | os.PathLike]) -> list[Source]:
    """Every folder under `folders` holding a `results.json` or an `eval_*.json` (run
    folders' `checkpoints/`, `tensorboard/` and hidden folders are skipped), sorted by path.

    Raises:
      FileNotFoundError: a folder that does not exist. ValueError: an unreadable JSON file.
    """
    from metanet_jax import pretrained

    found: dict[str, Source] = {}
    for folder in folders:
        root = Path(folder)
        if not root.is_dir():
            raise FileNotFoundError(f"{folder}: no such folder")
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(
                d for d in dirnames
                if not d.startswith(".") and d not in ("checkpoints", "tensorboard")
            )  # fmt: skip
            evals = sorted(f for f in filenames if f.startswith("eval_") and f.endswith(".json"))
            if "results.json" not in filenames and not evals:
                continue
            here = Path(dirpath)
            path = here / "results.json"
            results = RunResults.from_json(read_json(path) if path.is_file() else {}, str(path))
            flags = results.config
            if not isinstance(flags, dict):
                config = here / "config.json"
                flags = read_json(config).get("flags", {}) if config.is_file() else {}
            loaded = {f: EvalRecord.from_json(read_json(here / f), str(here / f)) for f in evals}
            key = display(here)
            found[key] = Source(key, pretrained.is_pretrained(here), results, flags, loaded)
    return [found[k] for k in sorted(found)]


def _default_protocol(source: Source, mnist: bool = False) -> dict[str, Any]:
    from experiments import protocol

    return protocol.mnist_protocol(source.flags) if mnist else protocol.protocol(source.flags)


def _evaluate_command(source: Source, e: EvalRecord | None) -> str:
    """The `experiments.evaluate` command that measures this number from the source."""
    parts = ["python -m experiments.evaluate", f"--workdir={source.path}"]
    if e is None:
        return " ".join(parts)
    data = str(e.data or "")
    mnist = data.startswith("mnist")
    proto = _default_protocol(source, mnist)
    if mnist:
        parts.append("--mnist")
    elif data.startswith("omniglot/"):
        split = data.split("/")[1]
        if split != source.flag("split", "standard") or source.flag("dataset") != "omniglot":
            parts.append(f"--split={split}")
    if not mnist and e.ways != proto["ways"]:
        parts.append(f"--ways={e.ways}")
    episode_flags = {"shots": e.shots, "queries_per_class": e.queries_per_class,
                     "episodes": e.episodes, "seed": e.seed, "batch": e.batch}  # fmt: skip
    for flag, value in episode_flags.items():
        if value is not None and value != proto[flag]:
            parts.append(f"--{flag}={value}")
    if source.path and not source.pretrained and e.checkpoint == "latest":
        parts.append("--checkpoint=latest")
    return " ".join(parts)


def measurements(sources: Sequence[Source]) -> list[Measurement]:
    """Every test accuracy of the sources (validation and Lake-run evaluations left out); one
    per source and setting, a source's own test before an `eval_*.json` of the same setting."""
    return [m for s in sources for m in _source_measurements(s)]


def _source_measurements(s: Source) -> list[Measurement]:
    out: list[Measurement] = []
    r = s.results
    if r.test_accuracy is not None:
        proto = r.test_protocol or {}
        dataset = s.flag("dataset", "omniglot")
        out.append(Measurement(
            s, dataset, s.flag("split", "standard") if dataset == "omniglot" else None,
            int(proto.get("ways", s.flag("ways", 5))), int(proto.get("shots", s.flag("shots", 1))),
            float(r.test_accuracy), r.test_ci95, r.test_episodes, _evaluate_command(s, None),
            "results.json",
        ))  # fmt: skip
    if r.mnist_accuracy is not None:
        out.append(Measurement(
            s, "mnist", None, 10, 1, float(r.mnist_accuracy), r.mnist_ci95, r.mnist_episodes,
            _evaluate_command(s, EvalRecord(data="mnist/test")), "results.json",
        ))  # fmt: skip
    seen = {(m.dataset, m.split, m.ways, m.shots) for m in out}
    for file, e in sorted(s.evals.items(), key=lambda fe: (-(fe[1].episodes or 0), fe[0])):
        parts = str(e.data or "").split("/")
        if parts[-1] != "test" or e.accuracy is None:
            continue
        dataset = parts[0]
        split = parts[1] if dataset == "omniglot" and len(parts) == 3 else None
        key = (dataset, split, int(e.ways or 0), int(1 if e.shots is None else e.shots))
        if key in seen:
            continue
        seen.add(key)
        out.append(Measurement(
            s, dataset, split, key[2], key[3], float(e.accuracy), e.ci95, e.episodes,
            _evaluate_command(s, e), file,
        ))  # fmt: skip
    return out


def hardware(source: Source) -> str:
    """What the model trained on: results.json's `hardware`, else its platform and devices."""
    r = source.results
    if r.hardware:
        return str(r.hardware)
    if not r.platform:
        return ""
    devices = r.devices or 1
    return f"{devices} x {r.platform.upper()}" if devices > 1 else r.platform.upper()


def steps_text(source: Source) -> str:
    """The training steps, `x <meta-batch> tasks` beside them when above 1; "" if unknown."""
    if source.results.steps is None:
        return ""
    batch = source.flag("meta_batch", 1)
    return f"{int(source.results.steps):,}" + (f" x {batch} tasks" if batch and batch > 1 else "")
