"""The results report: every measured number beside the paper's, written by a program.

`python -m experiments.report [folders...]` (default: `pretrained`) reads the `results.json`
and `eval_*.json` files under the given folders (run folders and pretrained models; see
`metanet_jax.pretrained`; read as `experiments.records`) and the ablation files
`docs/ablations/*.json`, and writes:

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

This module writes the documents; their parts live beside it: `report_sources` (the folders
read and their measurements), `paper_tables` (the paper's numbers and tables),
`ablation_report` (the ablation tables and their two file formats), `continual_report` (the
continual-learning record) and `report_markdown` (cells and tables). Their public names are
importable from here too.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from experiments import continual_report
from experiments import report_markdown as md
from experiments.ablation_report import ablations, check_ablation, write_ablation
from experiments.paper_tables import (
    PAPER_MINI_IMAGENET,
    PAPER_MNIST,
    PAPER_N_TO_K,
    PAPER_PREVIOUS,
    PAPER_STANDARD,
    VARIANT_NAMES,
    paper_number,
    sections,
    setting,
)
from experiments.records import RunResults
from experiments.report_sources import (
    Measurement,
    Source,
    find_sources,
    hardware,
    measurements,
    steps_text,
)

# The names other modules and tests import from here (the report's parts, re-exported).
__all__ = [
    "FLAGFILE_PROGRAMS", "PAPER_MINI_IMAGENET", "PAPER_MNIST", "PAPER_N_TO_K",
    "PAPER_PREVIOUS", "PAPER_STANDARD", "README_BEGIN", "README_END", "RESULT_PREFIX",
    "VARIANT_NAMES", "Measurement", "Source", "build", "check_ablation", "find_sources",
    "flagfile_text", "hardware", "measurements", "paper_number", "readme_block",
    "replace_block", "results_markdown", "write_ablation",
]  # fmt: skip

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
RESULT_PREFIX = "# result: "
FLAGFILE_PROGRAMS = {"continual": "experiments.continual"}  # by file-name prefix


def _models_table(sources: Sequence[Source]) -> list[str]:
    """The "Models" table: one row per source with a results.json."""
    rows = []
    for s in sources:
        r = s.results
        if r == RunResults():  # eval_*.json files only
            continue
        rows.append([
            f"`{s.path}`", setting(s), md.pct(r.test_accuracy, r.test_ci95),
            md.count(r.test_episodes), paper_number(s), md.pct(r.best_validation_accuracy),
            steps_text(s), md.duration(r.wall_time_s),
            "" if r.episodes_per_s is None else f"{r.episodes_per_s:.1f}", hardware(s),
            md.code(r.command),
        ])  # fmt: skip
    header = ("model", "setting", "test (95% CI)", "episodes", "paper", "best validation",
              "steps", "wall time", "episodes/s", "hardware", "reproduce (train)")  # fmt: skip
    if not rows:
        return ["No model yet: `python -m experiments.export_pretrained --workdir=<run> "
                "--name=<name>` adds one to `pretrained/`.", ""]  # fmt: skip
    return md.table(header, rows) + [""]


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
        *sections(ms),
        *continual_report.section(continual_record),
        *ablations(ablations_dir),
    ]
    return "\n".join(md.wrap(lines)).rstrip("\n") + "\n"


def readme_block(sources: Sequence[Source], folders: Sequence[str] = ("pretrained",)) -> str:
    """The README block between `README_BEGIN` and `README_END` (markers included)."""
    models = [s for s in sources if s.pretrained and s.results.test_accuracy is not None]
    lines = [README_BEGIN, ""]
    demo = next((s for s in models if s.name == "demo"), None)
    if demo is not None:
        r = demo.results
        lines += [
            f"The demo's model (`make demo`, shipped as `{demo.path}`) recorded **"
            f"{r.test_accuracy * 100:.2f}%** +- {r.test_ci95 * 100:.2f} test accuracy "
            f"(5-way 1-shot, 95% CI over {md.count(r.test_episodes)} episodes; "
            f"{steps_text(demo)} steps, {md.duration(r.wall_time_s)} on "
            f"{hardware(demo) or 'unknown hardware'}).",
            "",
        ]
    if models:
        rows = [
            [f"`{s.path}`", setting(s),
             md.pct(s.results.test_accuracy, s.results.test_ci95),
             md.count(s.results.test_episodes), paper_number(s), steps_text(s),
             md.duration(s.results.wall_time_s), hardware(s)]
            for s in models
        ]  # fmt: skip
        header = ("model", "setting", "test % (95% CI)", "episodes", "paper %", "steps",
                  "wall time", "hardware")  # fmt: skip
        lines += md.table(header, rows) + [""]
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
    return "\n".join(md.wrap(lines))


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
    ci = "" if r.test_ci95 is None else f" +- {100 * r.test_ci95:.2f}"
    return (
        f"{RESULT_PREFIX}test {100 * r.test_accuracy:.2f}%{ci} (95% CI, "
        f"{md.count(r.test_episodes)} episodes), {steps_text(source)} steps, "
        f"{md.duration(r.wall_time_s)} on {hardware(source) or '?'}: {source.path}"
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
        if s.results.flagfile == rel and s.results.test_accuracy is not None
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
