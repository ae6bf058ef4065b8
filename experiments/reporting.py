"""The results report: every measured number beside the paper's, written by a program.

`python -m experiments.report [folders...]` (default: `pretrained`) reads the `results.json`
and `eval_*.json` files under the given folders (run folders and pretrained models; see
`metanet_jax.pretrained`) and the ablation files `docs/ablations/*.json`, and writes:

* `docs/RESULTS.md`: the models, then one row per number of the paper's tables (Omniglot
  previous split, standard split, trained N-way tested K-way, MNIST out of domain,
  Mini-ImageNet; METANET.md) with the paper's number, ours with its 95% CI, the training
  steps, wall time and hardware, and the command that reproduces it (empty where not run);
  then the ablation tables;
* the block of README.md between `README_BEGIN` and `README_END`: the pretrained models'
  test accuracies (the demo's in percent with two decimals);
* the header of each flagfile: its command (`# python -m experiments.omniglot
  --flagfile=experiments/flags/<name>.flags`) and, where a model records that flagfile
  (`flagfile` in its results.json), one `# result: ...` line per model.

Everything is a function of the files read (sorted, no dates, paths as given), so running the
same command again writes the same bytes; `check=True` reports what would change instead.

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
fractions in [0, 1]. Both render as one table under "Ablations".
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments import continual_report

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
RESULT_PREFIX = "# result: "
FLAGFILE_PROGRAMS = {"continual": "experiments.continual"}  # by file-name prefix

# The paper's numbers (Munkhdalai & Yu, 2017; METANET.md), percent.
VARIANT_NAMES = {"metanet-": "MetaNet-", "metanet": "MetaNet", "metanet+": "MetaNet+"}
PAPER_PREVIOUS = {
    "metanet-": {5: "98.4", 10: "98.32", 15: "96.68", 20: "96.13"},
    "metanet": {5: "98.95", 10: "98.67", 15: "97.11", 20: "97.0"},
    "metanet+": {5: "98.45", 10: "97.05", 15: "96.48", 20: "95.08"},
}
PAPER_STANDARD = {5: "98.45", 10: "97.32", 15: "96.4", 20: "95.92"}
PAPER_N_TO_K = {
    5: {5: "98.95", 10: "96.4", 15: "93.6", 20: "93.07"},
    10: {5: "99.25", 10: "96.87", 15: "96.95", 20: "96.21"},
    15: {5: "99.35", 10: "98.17", 15: "97.11", 20: "96.36"},
    20: {5: "99.55", 10: "98.87", 15: "97.41", 20: "97.0"},
}
PAPER_MNIST = {"metanet-": "71.6", "metanet": "74.8", "metanet+": "72.3"}
PAPER_MINI_IMAGENET = "49.21 +- 0.96"

_ABLATION_REQUIRED = ("name", "flags", "steps", "wall_time_s", "val_accuracy", "val_ci95")
_ABLATION_OPTIONAL = ("description", "val_episodes", "test_accuracy", "test_ci95",
                      "test_episodes")  # fmt: skip


# ----------------------------------------------------------------------------- reading
@dataclasses.dataclass
class Source:
    """One folder with results: a training run or a pretrained model."""

    path: str  # as displayed (relative to the working folder when inside it)
    pretrained: bool
    results: dict[str, Any]
    flags: dict[str, Any]
    evals: list[dict[str, Any]]

    @property
    def name(self) -> str:
        return self.results.get("name") or Path(self.path).name

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


def _display(path: Path) -> str:
    try:
        return path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    except ValueError:
        return path.as_posix()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: cannot read JSON ({e})") from e
    if not isinstance(value, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return value


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
            results = _read_json(here / "results.json") if "results.json" in filenames else {}
            flags = results.get("config")
            if not isinstance(flags, dict):
                config = here / "config.json"
                flags = _read_json(config).get("flags", {}) if config.is_file() else {}
            loaded = []
            for f in evals:
                e = _read_json(here / f)
                e["file"] = f
                loaded.append(e)
            key = _display(here)
            found[key] = Source(key, pretrained.is_pretrained(here), results, flags, loaded)
    return [found[k] for k in sorted(found)]


def _default_protocol(source: Source, mnist: bool = False) -> dict[str, Any]:
    from experiments import protocol, train

    proto = protocol.protocol(source.flags)
    if mnist:
        proto.update(ways=10, seed=train.MNIST_SEED)
        proto["episodes"] = source.flags.get("mnist_test_episodes") or proto["episodes"]
    return proto


def _evaluate_command(source: Source, e: Mapping[str, Any] | None) -> str:
    """The `experiments.evaluate` command that measures this number from the source."""
    parts = ["python -m experiments.evaluate", f"--workdir={source.path}"]
    if e is None:
        return " ".join(parts)
    data = str(e.get("data", ""))
    mnist = data.startswith("mnist")
    proto = _default_protocol(source, mnist)
    if mnist:
        parts.append("--mnist")
    elif data.startswith("omniglot/"):
        split = data.split("/")[1]
        if split != source.flag("split", "standard") or source.flag("dataset") != "omniglot":
            parts.append(f"--split={split}")
    if not mnist and e.get("ways") != proto["ways"]:
        parts.append(f"--ways={e.get('ways')}")
    names = {"shots": "shots", "queries_per_class": "queries_per_class", "episodes": "episodes",
             "seed": "seed", "batch": "batch"}  # fmt: skip
    for key, flag in names.items():
        if e.get(key) is not None and e.get(key) != proto[key]:
            parts.append(f"--{flag}={e[key]}")
    if source.path and not source.pretrained and e.get("checkpoint") == "latest":
        parts.append("--checkpoint=latest")
    return " ".join(parts)


def measurements(sources: Sequence[Source]) -> list[Measurement]:
    """Every test accuracy of the sources (validation and Lake-run evaluations left out); one
    per source and setting, a source's own test before an `eval_*.json` of the same setting."""
    return [m for s in sources for m in _source_measurements(s)]


def _source_measurements(s: Source) -> list[Measurement]:
    out: list[Measurement] = []
    r = s.results
    if r.get("test_accuracy") is not None:
        proto = r.get("test_protocol") or {}
        dataset = s.flag("dataset", "omniglot")
        out.append(Measurement(
            s, dataset, s.flag("split", "standard") if dataset == "omniglot" else None,
            int(proto.get("ways", s.flag("ways", 5))), int(proto.get("shots", s.flag("shots", 1))),
            float(r["test_accuracy"]), r.get("test_ci95"), r.get("test_episodes"),
            _evaluate_command(s, None), "results.json",
        ))  # fmt: skip
    if r.get("mnist_accuracy") is not None:
        out.append(Measurement(
            s, "mnist", None, 10, 1, float(r["mnist_accuracy"]), r.get("mnist_ci95"),
            r.get("mnist_episodes"), _evaluate_command(s, {"data": "mnist/test"}), "results.json",
        ))  # fmt: skip
    seen = {(m.dataset, m.split, m.ways, m.shots) for m in out}
    for e in sorted(s.evals, key=lambda e: (-(e.get("episodes") or 0), e["file"])):
        parts = str(e.get("data", "")).split("/")
        if parts[-1] != "test" or e.get("accuracy") is None:
            continue
        dataset = parts[0]
        split = parts[1] if dataset == "omniglot" and len(parts) == 3 else None
        key = (dataset, split, int(e.get("ways", 0)), int(e.get("shots", 1)))
        if key in seen:
            continue
        seen.add(key)
        out.append(Measurement(
            s, dataset, split, key[2], key[3], float(e["accuracy"]), e.get("ci95"),
            e.get("episodes"), _evaluate_command(s, e), e["file"],
        ))  # fmt: skip
    return out


# ----------------------------------------------------------------------------- formatting
def _pct(value: float | None, ci: float | None = None, bold: bool = False) -> str:
    if value is None:
        return ""
    text = f"{100 * value:.2f}"
    text = f"**{text}**" if bold else text
    return text if ci is None else f"{text} +- {100 * ci:.2f}"


def _int(value: Any) -> str:
    return "" if value is None else f"{int(value):,}"


def _duration(seconds: Any) -> str:
    from metanet_jax.logging_utils import format_duration

    return "" if seconds is None else format_duration(float(seconds))


def hardware(source: Source) -> str:
    """What the model trained on: results.json's `hardware`, else its platform and devices."""
    r = source.results
    if r.get("hardware"):
        return str(r["hardware"])
    platform = r.get("platform")
    if not platform:
        return ""
    devices = r.get("devices") or 1
    return f"{devices} x {platform.upper()}" if devices > 1 else platform.upper()


def _steps(source: Source) -> str:
    steps = source.results.get("steps")
    if steps is None:
        return ""
    batch = source.flag("meta_batch", 1)
    return f"{int(steps):,}" + (f" x {batch} tasks" if batch and batch > 1 else "")


def _code(text: str | None) -> str:
    return f"`{text}`" if text else ""


def _setting(source: Source) -> str:
    f = source.flags
    dataset = f.get("dataset", "omniglot")
    where = {"omniglot": f"Omniglot {f.get('split', 'standard')} split",
             "mini_imagenet": "Mini-ImageNet", "synthetic": "synthetic data"}.get(
        dataset, str(dataset))  # fmt: skip
    variant = VARIANT_NAMES.get(f.get("variant", "metanet"), f.get("variant"))
    text = f"{variant}, {where}, {f.get('ways', '?')}-way {f.get('shots', '?')}-shot"
    arch = f.get("architecture", "omniglot_cnn")
    if arch == "mlp":
        text += ", MLP networks"
    elif arch == "rows_lstm":
        text += f", rows read by an LSTM of {f.get('hidden_units') or 64} units"
    elif f.get("conv_channels"):
        text += f", {f['conv_channels']} channels"
    return text


def paper_number(source: Source) -> str:
    """The paper's number for the setting a model trained and tests on ("" if none)."""
    f = source.flags
    ways, variant = f.get("ways"), f.get("variant", "metanet")
    if f.get("shots", 1) != 1:
        return ""
    if f.get("dataset", "omniglot") == "mini_imagenet":
        return PAPER_MINI_IMAGENET if ways == 5 and variant == "metanet" else ""
    if f.get("dataset", "omniglot") != "omniglot" or f.get("architecture") in ("mlp", "rows_lstm"):
        return ""  # the paper's numbers are its CNN's
    if f.get("split") == "previous":
        return PAPER_PREVIOUS.get(variant, {}).get(ways, "")
    if f.get("split", "standard") == "standard" and variant == "metanet":
        return PAPER_STANDARD.get(ways, "")
    return ""


# ----------------------------------------------------------------------------- tables
_CELL_HEADER = ("ours (95% CI)", "episodes", "source", "steps", "wall time", "hardware",
                "reproduce (test)")  # fmt: skip


def _cells(ms: list[Measurement]) -> list[list[str]]:
    """The "ours" columns: one list per measurement, or one empty list if none."""
    if not ms:
        return [[""] * len(_CELL_HEADER)]
    rows = []
    for m in sorted(ms, key=lambda m: (m.source.path, m.origin)):
        rows.append([
            _pct(m.accuracy, m.ci95), _int(m.episodes), f"`{m.source.path}`", _steps(m.source),
            _duration(m.source.results.get("wall_time_s")), hardware(m.source), _code(m.command),
        ])  # fmt: skip
    return rows


def _wrap(lines: Sequence[str]) -> list[str]:
    """Paragraph lines wrapped at 95 characters (table rows, headings and markers kept)."""
    import textwrap

    out = []
    for line in lines:
        if len(line) <= 95 or line.startswith(("|", "#", "<!--")):
            out.append(line)
        else:
            out += textwrap.wrap(line, width=95, break_long_words=False, break_on_hyphens=False)
    return out


def _table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _mixed(source: Source) -> bool:
    """Whether the model trained on episodes of several ways (`--train_ways`)."""
    return bool(source.flag("train_ways"))


def _omniglot_cell(ms, *, split, variant, trained, tested, one_ways=False) -> list[Measurement]:
    """The measurements of one Omniglot setting. `trained`: the ways the model names (None:
    any; "mixed": the tested ways, or any for a model trained on episodes of several ways);
    `one_ways`: only models trained on episodes of one ways."""
    return [
        m for m in ms
        if m.dataset == "omniglot" and m.split == split and m.ways == tested and m.shots == 1
        and m.source.flag("dataset", "omniglot") == "omniglot"
        and m.source.flag("architecture", "omniglot_cnn") == "omniglot_cnn"
        and m.source.flag("variant", "metanet") == variant and m.source.flag("shots", 1) == 1
        and (trained in (None, m.source.flag("ways"))
             or (trained == "mixed" and (_mixed(m.source) or m.source.flag("ways") == tested)))
        and not (one_ways and _mixed(m.source))
    ]  # fmt: skip


def _omniglot_rows(ms: list[Measurement], settings, one_ways=False) -> list[list[str]]:
    """The rows of an Omniglot table: for each `(first columns, split, variant, trained ways,
    tested ways)` of `settings`, one row per measurement of that setting (or one empty)."""
    rows = []
    for first, split, variant, trained, tested in settings:
        found = _omniglot_cell(ms, split=split, variant=variant, trained=trained, tested=tested,
                               one_ways=one_ways)  # fmt: skip
        rows += [[*first, *cells] for cells in _cells(found)]
    return rows


def _paper_tables(ms: list[Measurement]) -> list[str]:
    """The sections of the paper's tables, each with our measurements beside the paper's."""
    tables = (_previous_split, _standard_split, _standard_k_way, _n_to_k, _mnist,
              _mini_imagenet)  # fmt: skip
    return [line for table in tables for line in table(ms)]


def _previous_split(ms: list[Measurement]) -> list[str]:
    out = ["## Omniglot, previous split (Vinyals et al.), 1-shot", "",
           "Paper Table 1: N-way tests of 423 test characters after training on 1,200 "
           "(`previous_<N>way_<variant>.flags`: trained N-way). A model trained on episodes "
           "of several ways (`--train_ways`, e.g. `previous_cpu.flags`) stands in every "
           "column it was tested at; \"trained\" says how each model was trained.",
           ""]  # fmt: skip
    rows = []
    for v in ("metanet-", "metanet", "metanet+"):
        for n in (5, 10, 15, 20):
            found = _omniglot_cell(ms, split="previous", variant=v, trained="mixed", tested=n)
            for m in sorted(found, key=lambda m: m.source.path) or [None]:
                how = "" if m is None else _training(m.source)
                cells = _cells([] if m is None else [m])[0]
                rows.append([VARIANT_NAMES[v], str(n), PAPER_PREVIOUS[v][n], how, *cells])
    return out + _table(("model", "N-way", "paper", "trained", *_CELL_HEADER), rows) + [""]


def _standard_split(ms: list[Measurement]) -> list[str]:
    out = ["## Omniglot, standard split (Lake et al.), MetaNet 1-shot", "",
           "Trained on the 30 background alphabets, tested on the 20 evaluation alphabets "
           "(`standard_<N>way.flags`; the demo is a smaller 5-way network).", ""]  # fmt: skip
    rows = _omniglot_rows(ms, [
        ((str(n), PAPER_STANDARD[n]), "standard", "metanet", n, n) for n in (5, 10, 15, 20)
    ])  # fmt: skip
    return out + _table(("N-way", "paper", *_CELL_HEADER), rows) + [""]


def _training(source: Source) -> str:
    """How a model was trained, for a table's "trained" column: ways, channels, augmented
    layers (the steps, wall time and hardware have columns of their own)."""
    f = source.flags
    mixed = f.get("train_ways") or ()
    parts = [f"{'/'.join(map(str, mixed))}-way episodes" if mixed else f"{f.get('ways')}-way"]
    if f.get("architecture", "omniglot_cnn") == "mlp":
        parts.append("MLP networks")
    elif f.get("conv_channels"):
        parts.append(f"{f['conv_channels']} channels")
    model = source.results.get("model_config") or {}
    chosen = [model.get(k) for k in ("augment_base", "augment_representation")]
    if any(c is not None for c in chosen):
        named = ["all" if c is None else ",".join(c) for c in chosen]
        parts.append(f"augmented b: {named[0]}; u: {named[1]}")
    else:
        parts.append("all layers augmented")
    return ", ".join(parts)


def _standard_k_way(ms: list[Measurement]) -> list[str]:
    out = ["## Omniglot, standard split, models tested at other ways (MetaNet, 1-shot)", "",
           "A standard-split model tested on K-way episodes of the 20 evaluation alphabets "
           "other than the ways it names (`python -m experiments.evaluate --workdir=... "
           "--ways=K`); the paper's number is for a model trained K-way.",
           ""]  # fmt: skip
    rows = []
    for k in (5, 10, 15, 20):
        found = [
            m for m in _omniglot_cell(ms, split="standard", variant="metanet", trained=None,
                                      tested=k)
            if m.source.flag("ways") != k
        ]  # fmt: skip
        for m in sorted(found, key=lambda m: m.source.path):
            rows.append([str(k), PAPER_STANDARD[k], _training(m.source), *_cells([m])[0]])
    if not rows:
        rows = [["", "", "", *_cells([])[0]]]
    return out + _table(("tested", "paper", "trained", *_CELL_HEADER), rows) + [""]


def _n_to_k(ms: list[Measurement]) -> list[str]:
    out = ["## Trained N-way, tested K-way (previous split, MetaNet, 1-shot)", "",
           "A model trained N-way with 20 output units (`--max_ways=20`) tested on K-way "
           "episodes: `python -m experiments.evaluate --workdir=... --ways=K` (models trained "
           "on episodes of several ways stand in Table 1).", ""]  # fmt: skip
    rows = _omniglot_rows(ms, [
        ((str(n), str(k), PAPER_N_TO_K[n][k]), "previous", "metanet", n, k)
        for n in (5, 10, 15, 20) for k in (5, 10, 15, 20)
    ], one_ways=True)  # fmt: skip
    return out + _table(("trained", "tested", "paper", *_CELL_HEADER), rows) + [""]


def _mnist(ms: list[Measurement]) -> list[str]:
    out = ["## MNIST 10-way 1-shot, out of domain", "",
           "After Omniglot training, tested on MNIST's test digits (the paper used MLP "
           "networks: `mnist_out_of_domain_<variant>.flags`; any Omniglot model can be tested "
           "with `python -m experiments.evaluate --workdir=... --mnist`).", ""]  # fmt: skip
    rows = []
    for variant in ("metanet-", "metanet", "metanet+"):
        found = [
            m for m in ms
            if m.dataset == "mnist" and m.ways == 10 and m.shots == 1
            and m.source.flag("dataset", "omniglot") == "omniglot"
            and m.source.flag("variant", "metanet") == variant
        ]  # fmt: skip
        for cells in _cells(found):
            rows.append([VARIANT_NAMES[variant], PAPER_MNIST[variant], *cells])
    return out + _table(("model", "paper", *_CELL_HEADER), rows) + [""]


def _mini_imagenet(ms: list[Measurement]) -> list[str]:
    out = ["## Mini-ImageNet, 5-way 1-shot", "",
           "Ravi & Larochelle's split (`mini_imagenet_5way1shot.flags`; the data is not "
           "distributed here).", ""]  # fmt: skip
    found = [
        m for m in ms
        if m.dataset == "mini_imagenet" and m.ways == 5 and m.shots == 1
        and m.source.flag("variant", "metanet") == "metanet"
    ]  # fmt: skip
    rows = [["MetaNet", PAPER_MINI_IMAGENET, *cells] for cells in _cells(found)]
    return out + _table(("model", "paper", *_CELL_HEADER), rows) + [""]


def _models_table(sources: Sequence[Source]) -> list[str]:
    rows = []
    for s in sources:
        r = s.results
        if not r:
            continue
        rows.append([
            f"`{s.path}`", _setting(s),
            _pct(r.get("test_accuracy"), r.get("test_ci95")) if r.get("test_accuracy") is not None
            else "", _int(r.get("test_episodes")), paper_number(s),
            _pct(r.get("best_validation_accuracy")), _steps(s), _duration(r.get("wall_time_s")),
            "" if r.get("episodes_per_s") is None else f"{r['episodes_per_s']:.1f}", hardware(s),
            _code(r.get("command")),
        ])  # fmt: skip
    header = ("model", "setting", "test (95% CI)", "episodes", "paper", "best validation",
              "steps", "wall time", "episodes/s", "hardware", "reproduce (train)")  # fmt: skip
    if not rows:
        return ["No model yet: `python -m experiments.export_pretrained --workdir=<run> "
                "--name=<name>` adds one to `pretrained/`.", ""]  # fmt: skip
    return _table(header, rows) + [""]


# ----------------------------------------------------------------------------- ablations
_ACCURACIES = ("val_accuracy", "val_ci95", "best_validation_accuracy", "best_validation_ci95",
               "final_validation_accuracy", "final_validation_ci95", "test_accuracy",
               "test_ci95", "test_accuracy_record_only")  # fmt: skip


def check_ablation(value: Mapping[str, Any], where: str = "ablation") -> None:
    """Raises ValueError (one line naming `where`, the row and the field) unless `value` is
    an ablation table in one of the two formats of the module docstring."""
    if not isinstance(value, Mapping) or not isinstance(value.get("title", value.get("name")), str):
        raise ValueError(f"{where}: needs a string 'title' (or 'name')")
    rows = value.get("rows")
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"{where}: needs a non-empty list 'rows'")
    for i, row in enumerate(rows):
        if not isinstance(row, Mapping):
            raise ValueError(f"{where}: row {i} is not an object")
        missing = [k for k in ("name", "steps", "wall_time_s") if row.get(k) is None]
        if row.get("val_accuracy") is None and row.get("best_validation_accuracy") is None:
            missing.append("val_accuracy (or best_validation_accuracy)")
        if missing:
            raise ValueError(f"{where}: row {i} ({row.get('name')!r}) lacks {', '.join(missing)}")
        for k in _ACCURACIES:
            v = row.get(k)
            if v is not None and not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                raise ValueError(f"{where}: row {i} {k}={v!r} is not a fraction in [0, 1]")


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
    check_ablation(value, str(path))
    unknown = sorted({k for r in rows for k in r} - set(_ABLATION_REQUIRED) -
                     set(_ABLATION_OPTIONAL))  # fmt: skip
    if unknown:
        raise ValueError(f"{path}: unknown row field(s) {', '.join(unknown)}")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, value)
    return Path(path)


def _flags_text(flags: Any) -> str:
    if isinstance(flags, (list, tuple)):
        flags = " ".join(str(f) for f in flags)
    return _code(str(flags)) if flags else ""


def _ablation_section(path: Path) -> list[str]:
    value = _read_json(path)
    check_ablation(value, str(path))
    out = [f"### {value.get('title') or value['name']}", ""]
    if value.get("description"):
        out += [str(value["description"]), ""]
    notes = []
    if value.get("base_flagfile"):
        common = " ".join(value.get("common_flags") or [])
        notes.append(f"Every run: `{value['base_flagfile']}`" + (f" with `{common}`." if common
                                                                  else "."))  # fmt: skip
    if value.get("command"):
        notes.append(f"Command: `{value['command']}`.")
    if value.get("hardware"):
        notes.append(f"Hardware: {value['hardware']}.")
    notes.append(f"Source: `{_display(path)}`.")
    out += [" ".join(notes), ""]
    header = ["candidate", "flags", "steps", "wall time", "episodes/s",
              "validation (95% CI)", "best at step", "final validation", "val. episodes",
              "test (record only)", "test episodes", "what"]  # fmt: skip
    more_ways = sorted({int(k) for r in value["rows"] for k in r.get("validation_by_ways", {})})
    header[6:6] = [f"validation {k}-way" for k in more_ways]
    lines = []
    for r in value["rows"]:
        by_ways = r.get("validation_by_ways", {})
        at_ways = [by_ways.get(str(k), {}) for k in more_ways]
        val = r.get("val_accuracy", r.get("best_validation_accuracy"))
        val_ci = r.get("val_ci95", r.get("best_validation_ci95"))
        test = r.get("test_accuracy", r.get("test_accuracy_record_only"))
        eps = r.get("episodes_per_s")
        lines.append([
            str(r["name"]), _flags_text(r.get("flags")), _int(r["steps"]),
            _duration(r["wall_time_s"]), "" if eps is None else f"{eps:.2f}", _pct(val, val_ci),
            *(_pct(v.get("accuracy"), v.get("ci95")) for v in at_ways),
            _int(r.get("best_validation_step")),
            _pct(r.get("final_validation_accuracy"), r.get("final_validation_ci95")),
            _int(r.get("val_episodes", r.get("validation_episodes"))),
            _pct(test, r.get("test_ci95")), _int(r.get("test_episodes")),
            str(r.get("description") or ""),
        ])  # fmt: skip
    return out + _table(header, lines) + [""]


def _ablations(folder: Path | None) -> list[str]:
    files = sorted(folder.glob("*.json")) if folder is not None and folder.is_dir() else []
    out = ["## Ablations", ""]
    if not files:
        where = _display(folder) if folder is not None else "docs/ablations"
        return out + [f"None yet (`{where}/*.json`: `python -m experiments.ablation`).", ""]
    for f in files:
        out += _ablation_section(f)
    return out


# ----------------------------------------------------------------------------- documents
def results_markdown(
    sources: Sequence[Source],
    folders: Sequence[str],
    ablations_dir: Path | None,
    continual_record: Path | None = None,
) -> str:
    """The text of docs/RESULTS.md (`continual_record`: the committed continual-learning
    record, `continual_report.RECORD`)."""
    ms = measurements(sources)
    given = " ".join(folders)
    lines = [
        "# Results",
        "",
        f"Written by `python -m experiments.report {given}` from the `results.json` and "
        "`eval_*.json` files of those folders and from `docs/ablations/*.json`; do not edit "
        "by hand. Accuracies are percentages of query examples classified correctly, the mean "
        "over a fixed, seeded set of test episodes with its 95% confidence interval "
        "(`1.96 * std / sqrt(episodes)`). A pretrained model's numbers were measured on the "
        "CPU by `experiments.evaluate` with the run's own protocol (`results.json`: "
        '`test_protocol`); "reproduce (test)" prints the number again from the shipped '
        'parameters, "reproduce (train)" trains the model again. Steps are parameter '
        "updates (x tasks per update when the meta-batch is above 1). The paper's numbers are "
        "those of Munkhdalai & Yu (2017) as listed in METANET.md. An empty row has not been "
        "run yet.",
        "",
        "## Models",
        "",
        *_models_table(sources),
        *_paper_tables(ms),
        *continual_report.section(continual_record),
        *_ablations(ablations_dir),
    ]
    return "\n".join(_wrap(lines)).rstrip("\n") + "\n"


def readme_block(sources: Sequence[Source], folders: Sequence[str] = ("pretrained",)) -> str:
    """The README block between `README_BEGIN` and `README_END` (markers included)."""
    models = [s for s in sources if s.pretrained and s.results.get("test_accuracy") is not None]
    lines = [README_BEGIN, ""]
    demo = next((s for s in models if s.name == "demo"), None)
    if demo is not None:
        r = demo.results
        lines += [
            f"The demo's model (`make demo`, shipped as `{demo.path}`) recorded **"
            f"{r['test_accuracy'] * 100:.2f}%** +- {r['test_ci95'] * 100:.2f} test accuracy "
            f"(5-way 1-shot, 95% CI over {_int(r.get('test_episodes'))} episodes; "
            f"{_steps(demo)} steps, {_duration(r.get('wall_time_s'))} on "
            f"{hardware(demo) or 'unknown hardware'}).",
            "",
        ]
    if models:
        rows = [
            [f"`{s.path}`", _setting(s),
             _pct(s.results["test_accuracy"], s.results.get("test_ci95")),
             _int(s.results.get("test_episodes")), paper_number(s), _steps(s),
             _duration(s.results.get("wall_time_s")), hardware(s)]
            for s in models
        ]  # fmt: skip
        header = ("model", "setting", "test % (95% CI)", "episodes", "paper %", "steps",
                  "wall time", "hardware")  # fmt: skip
        lines += _table(header, rows) + [""]
    else:
        lines += ["No pretrained model yet (`python -m experiments.export_pretrained`).", ""]
    lines += [
        f"Written by `python -m experiments.report {' '.join(folders)}` from the models' "
        "`results.json` (each shipped model's test accuracy as measured on the CPU; `python -m "
        "experiments.evaluate --workdir=pretrained/<name>` prints it again); every table of the "
        "paper is in [docs/RESULTS.md](docs/RESULTS.md).",
        "",
        README_END,
    ]
    return "\n".join(_wrap(lines))


def replace_block(text: str, block: str, where: str = "README.md") -> str:
    """`text` with the part from `README_BEGIN` to `README_END` replaced by `block`.

    Raises:
      ValueError: the markers are missing or out of order.
    """
    start, end = text.find(README_BEGIN), text.find(README_END)
    if start < 0 or end < start:
        raise ValueError(f"{where}: needs the lines {README_BEGIN} and {README_END}")
    return text[:start] + block + text[end + len(README_END) :]


def _result_line(source: Source) -> str:
    r = source.results
    ci = "" if r.get("test_ci95") is None else f" +- {100 * r['test_ci95']:.2f}"
    return (
        f"{RESULT_PREFIX}test {100 * r['test_accuracy']:.2f}%{ci} (95% CI, "
        f"{_int(r.get('test_episodes'))} episodes), {_steps(source)} steps, "
        f"{_duration(r.get('wall_time_s'))} on {hardware(source) or '?'}: {source.path}"
    )


def flagfile_text(path: Path, text: str, sources: Sequence[Source]) -> str:
    """A flagfile's text with its header: the command line, then one result line per model
    that records this flagfile (existing header lines of that form are replaced)."""
    program = next(
        (p for prefix, p in FLAGFILE_PROGRAMS.items() if path.name.startswith(prefix)),
        "experiments.omniglot",
    )
    rel = f"experiments/flags/{path.name}"
    command = f"# python -m {program} --flagfile={rel}"
    lines = text.splitlines()
    if lines and lines[0].startswith("# python -m "):
        lines = lines[1:]
    while lines and lines[0].startswith(RESULT_PREFIX):
        lines = lines[1:]
    results = [
        _result_line(s) for s in sources
        if s.results.get("flagfile") == rel and s.results.get("test_accuracy") is not None
    ]  # fmt: skip
    return "\n".join([command, *results, *lines]) + "\n"


def build(
    folders: Sequence[str],
    *,
    output: str | os.PathLike = "docs/RESULTS.md",
    readme: str | os.PathLike | None = "README.md",
    flags_dir: str | os.PathLike | None = "experiments/flags",
    ablations_dir: str | os.PathLike | None = "docs/ablations",
    continual_record: str | os.PathLike | None = continual_report.RECORD,
    check: bool = False,
) -> list[str]:
    """Writes (or with `check`, only compares) RESULTS.md, README's block and the flagfile
    headers; continual runs among `folders` (`continual_report.is_run`) are gathered into
    `continual_record` first, and the rest (default: `pretrained`) are the report's models.

    Returns:
      The paths whose content differs(ed) from what the report writes.
    """
    runs = [f for f in folders if continual_report.is_run(f)]
    folders = [f for f in folders if f not in runs] or (["pretrained"] if runs else [])
    record = None if continual_record is None else Path(continual_record)
    changed = []
    if runs:
        if record is None:
            raise ValueError(f"continual runs given ({', '.join(map(str, runs))}) but no record")
        changed += continual_report.write(runs, record, check=check)
    sources = find_sources(folders)
    wanted: dict[Path, str] = {
        Path(output): results_markdown(
            sources,
            list(folders),
            None if ablations_dir is None else Path(ablations_dir),
            record,
        )
    }
    if readme is not None:
        text = Path(readme).read_text()
        block = readme_block(sources, list(folders))
        wanted[Path(readme)] = replace_block(text, block, str(readme))
    if flags_dir is not None:
        for path in sorted(Path(flags_dir).glob("*.flags")):
            wanted[path] = flagfile_text(path, path.read_text(), sources)
    for path, text in wanted.items():
        old = path.read_text() if path.is_file() else None
        if old == text:
            continue
        changed.append(str(path))
        if not check:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
    return changed
