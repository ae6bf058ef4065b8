"""The continual-learning record: the seeds' `continual.json` gathered into one committed
file, its plot, and its section of docs/RESULTS.md.

  python -m experiments.report workdirs/continual_seed0 ... workdirs/continual_seed4

A folder given to the report that holds a `continual.json` (written by
`experiments.continual`) is a continual run: the report gathers those runs, one entry per seed
exactly as the program wrote it, into `docs/continual/continual.json` and draws
`docs/continual/continual.png` (Omniglot change against MNIST trials, one line per seed, the
paper's band shaded; MNIST accuracy beside it). docs/RESULTS.md's continual-learning section is
rendered from the committed file, so `python -m experiments.report pretrained --check` stays
exact on any machine.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from experiments.records import read_json

# METANET.md: Omniglot accuracy changed between -1.7 and +1.24 points while MNIST was learned.
PAPER_BAND_POINTS = (-1.7, 1.24)
RUN_FILE = "continual.json"
RECORD = Path("docs/continual/continual.json")


def is_run(folder: str | Path) -> bool:
    """Whether `folder` is a continual run's workdir (holds `continual.json`)."""
    return (Path(folder) / RUN_FILE).is_file()


def gather(folders: Sequence[str | Path]) -> dict[str, Any]:
    """The record of the continual runs in `folders`: `{"paper_band_points", "runs"}`, the
    runs (each `continual.json` as written) ordered by seed.

    Raises:
      ValueError: a run is unfinished (its curve stops before `mnist_steps`) or two runs have
        the same seed.
    """
    runs = []
    for folder in folders:
        path = Path(folder) / RUN_FILE
        run = read_json(path)
        done = run["curve"][-1]["mnist_trials"] if run.get("curve") else None
        if done != run["config"]["mnist_steps"]:
            raise ValueError(
                f"{path}: the MNIST phase stopped at {done} of {run['config']['mnist_steps']} "
                "trials; finish the run (the same command resumes it) before reporting it"
            )
        runs.append(run)
    seeds = [r["config"]["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"continual runs repeat a seed: {sorted(seeds)} ({list(folders)})")
    runs.sort(key=lambda r: r["config"]["seed"])
    return {"paper_band_points": list(PAPER_BAND_POINTS), "runs": runs}


def record_text(record: Mapping[str, Any]) -> str:
    """The committed file's text (stable: sorted keys, one indent)."""
    return json.dumps(record, indent=1, sort_keys=True) + "\n"


def plot(record: Mapping[str, Any], path: str | Path) -> Path | None:
    """Omniglot change (points) against MNIST trials per seed, the paper's band shaded, and
    the MNIST accuracy beside it; `None` without matplotlib."""
    from metanet_jax import logging_utils

    plt = logging_utils._pyplot()
    if plt is None:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    lo, hi = record["paper_band_points"]
    left.axhspan(lo, hi, color="gray", alpha=0.2, label=f"paper: {lo:+.2f} to {hi:+.2f}")
    left.axhline(0.0, color="gray", linewidth=0.8)
    for run in record["runs"]:
        curve, before = run["curve"], run["omniglot_accuracy_before"]
        seed = run["config"]["seed"]
        trials = [c["mnist_trials"] for c in curve]
        left.plot(trials, [100 * (c["omniglot_accuracy"] - before) for c in curve],
                  marker="o", markersize=3, label=f"seed {seed}")  # fmt: skip
        measured = [c for c in curve if c["mnist_accuracy"] is not None]
        right.plot([c["mnist_trials"] for c in measured],
                   [100 * c["mnist_accuracy"] for c in measured],
                   marker="o", markersize=3, label=f"seed {seed}")  # fmt: skip
    left.set(xlabel="MNIST trials", ylabel="Omniglot accuracy change (points)",
             title="Omniglot while MNIST is learned")  # fmt: skip
    right.set(xlabel="MNIST trials", ylabel="MNIST test accuracy (%)", title="MNIST")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def section(record_path: Path | None) -> list[str]:
    """docs/RESULTS.md's continual-learning section, from the committed record."""
    from metanet_jax.logging_utils import format_duration

    out = [
        "## Continual learning: Omniglot, then MNIST (MLP MetaNet)",
        "",
        "The protocol of METANET.md (`experiments.continual`, `continual.flags`): the MLP "
        "MetaNet trains on Omniglot (previous split, 10-way 1-shot), then on MNIST with 50 pixel "
        "permutations (500 classes) with new W and Q and the same generators Z and G, trained "
        "further. Every 500 MNIST trials, Omniglot test accuracy is measured with Omniglot's W "
        "and Q and the current Z and G (400 fixed 10-way episodes); the change against the "
        "accuracy before MNIST is the forgetting (negative) or gain the shared meta-learners "
        f"cause. The paper's band over five repeats: {PAPER_BAND_POINTS[0]:+.2f} to "
        f"{PAPER_BAND_POINTS[1]:+.2f} points.",
        "",
    ]
    if record_path is None or not record_path.is_file():
        return out + [
            "Not run yet: `python -m experiments.continual --flagfile=experiments/flags/"
            "continual.flags --seed=S` for S = 0..4, then `python -m experiments.report "
            "<their workdirs>` writes `docs/continual/`.",
            "",
        ]
    record = read_json(record_path)
    rows = []
    for run in record["runs"]:
        cfg, curve = run["config"], run["curve"]
        before = run["omniglot_accuracy_before"]
        rows.append([
            str(cfg["seed"]),
            f"{100 * before:.2f} +- {100 * curve[0]['omniglot_ci95']:.2f}",
            f"{100 * run['omniglot_change_min']:+.2f}",
            f"{100 * run['omniglot_change_max']:+.2f}",
            f"{100 * (curve[-1]['omniglot_accuracy'] - before):+.2f}",
            f"{100 * curve[-1]['mnist_accuracy']:.2f}",
            f"{cfg['omniglot_steps']:,} + {cfg['mnist_steps']:,}",
            format_duration(float(run["wall_time_s"])),
            f"`python -m experiments.continual --flagfile=experiments/flags/continual.flags "
            f"--seed={cfg['seed']}`",
        ])  # fmt: skip
    header = ("seed", "Omniglot before (95% CI)", "min change", "max change", "final change",
              "final MNIST", "steps (Omniglot + MNIST)", "wall time", "reproduce")  # fmt: skip
    out += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(r) + " |" for r in rows]
    changes = [100 * r[k] for r in record["runs"] for k in ("omniglot_change_min",
                                                             "omniglot_change_max")]  # fmt: skip
    out += [
        "",
        f"Accuracies in %, changes in points (against the accuracy before MNIST; MNIST 10-way "
        f"1-shot on the permuted test digits). Over the {len(record['runs'])} seeds the change "
        f"ranged from {min(changes):+.2f} to {max(changes):+.2f} points (paper: "
        f"{PAPER_BAND_POINTS[0]:+.2f} to {PAPER_BAND_POINTS[1]:+.2f}). Wall time is the "
        "run's last process. Source: `docs/continual/continual.json` (`python -m "
        "experiments.report <the seeds' workdirs>`).",
        "",
        "![Omniglot change and MNIST accuracy while MNIST is learned](continual/continual.png)",
        "",
    ]
    return out


def write(folders: Sequence[str | Path], record: Path = RECORD, *, check: bool = False):
    """Gathers the runs into `record` and draws the plot beside it (with `check`: compares
    only). Returns the paths that differ(ed)."""
    gathered = gather(folders)
    text = record_text(gathered)
    old = record.read_text() if record.is_file() else None
    if old == text:
        return []
    if not check:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(text)
        plot(gathered, record.with_suffix(".png"))
    return [str(record)]
