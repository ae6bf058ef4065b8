"""Run outputs: metrics (TensorBoard + `metrics.jsonl`), progress lines, results files, plots.

Nothing here imports TensorFlow: TensorBoard event files are written with TensorBoard's own
protos and record framing (`tensorboard.compat.proto`), and plots use matplotlib's Agg backend.
Both are optional: without TensorBoard the metrics go to `metrics.jsonl` only, without
matplotlib no plot is drawn; either says so once, in one line (e.g. on an accelerator machine
that has only JAX and its libraries).
"""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import platform
import struct
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from absl import logging

LIBRARIES = (
    "metanet-jax",
    "jax",
    "jaxlib",
    "flax",
    "optax",
    "orbax-checkpoint",
    "numpy",
    "tensorflow-datasets",
)


def library_versions() -> dict[str, str]:
    """Installed versions of the libraries a run depends on (and Python's)."""
    out = {"python": platform.python_version()}
    for name in LIBRARIES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def write_json_atomic(path: str | os.PathLike, value: Any) -> None:
    """Writes JSON to a temporary file, then renames it over `path`."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, tuple):
        return list(x)
    raise TypeError(f"not JSON serialisable: {type(x).__name__}")


_NOTICES: set[str] = set()


def _notice_once(key: str, message: str) -> None:
    """Logs `message` (a warning) the first time `key` is seen in this process."""
    if key not in _NOTICES:
        _NOTICES.add(key)
        logging.warning(message)


# ----------------------------------------------------------------------------- TensorBoard
class _EventWriter:
    """Minimal TensorBoard event-file writer (scalars only), no TensorFlow needed."""

    def __init__(self, logdir: Path):
        from tensorboard.compat.proto import event_pb2

        self._event_pb2 = event_pb2
        logdir.mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{platform.node()}.{os.getpid()}.0"
        self._file = open(logdir / name, "ab")  # noqa: SIM115 - closed in close()
        self._write(event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2"))

    def _write(self, event) -> None:
        from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

        data = event.SerializeToString()
        header = struct.pack("<Q", len(data))
        self._file.write(header + struct.pack("<I", masked_crc32c(header)))
        self._file.write(data + struct.pack("<I", masked_crc32c(data)))

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        from tensorboard.compat.proto import summary_pb2

        summary = summary_pb2.Summary(
            value=[
                summary_pb2.Summary.Value(tag=k, simple_value=float(v)) for k, v in values.items()
            ]
        )
        self._write(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class MetricsWriter:
    """Scalars to TensorBoard (`<workdir>/tensorboard`) and to `<workdir>/metrics.jsonl`.

    Each `write` appends one JSON line `{"step": s, "wall_time": t, **values}` (a training
    record's `window_steps` says how many steps its averages cover). On resume,
    lines with a step above the resumed step are dropped first, so the file never holds two
    records of one step from different runs.
    """

    def __init__(self, workdir: str | os.PathLike, *, resume_step: int | None = None):
        workdir = Path(workdir)
        self.path = workdir / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in kept))
        self._jsonl = open(self.path, "a")  # noqa: SIM115 - closed in close()
        try:
            self._tb: _EventWriter | None = _EventWriter(workdir / "tensorboard")
        except ImportError:
            self._tb = None
            _notice_once(
                "tensorboard",
                "TensorBoard is not installed: metrics go to metrics.jsonl only (pip install "
                "tensorboard for event files)",
            )

    def write(self, step: int, values: Mapping[str, float]) -> None:
        values = {k: float(v) for k, v in values.items()}
        record = {"step": int(step), "wall_time": time.time(), **values}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.scalars(int(step), values)

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a `metrics.jsonl` (a torn last line is skipped)."""
    out = []
    for line in Path(path).read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


# ----------------------------------------------------------------------------- progress
def format_duration(seconds: float) -> str:
    """`3h04m`, `12m05s` or `42s`."""
    if not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    if h:
        return f"{h}h{m:02d}m"
    if m:
        return f"{m}m{s:02d}s"
    return f"{s}s"


def progress_line(
    step: int,
    total: int,
    episodes_per_s: float,
    loss: float,
    accuracy: float,
    eta_s: float,
) -> str:
    """`step 120/2000  episodes/s 14.2  loss 23.41  train acc 0.812  ETA 9m52s`."""
    return (
        f"step {step}/{total}  episodes/s {episodes_per_s:.1f}  loss {loss:.3f}  "
        f"train acc {accuracy:.3f}  ETA {format_duration(eta_s)}"
    )


def window_note(steps: int, log_every: int, step: int, resumed_at: int) -> str:
    """What a progress line's averages cover when that is not the last `log_every` steps.

    Args:
      steps: the steps averaged (those of the window run by this process).
      log_every: the window length.
      step: the step of the line (the last of the window).
      resumed_at: the step this process started from.

    Returns:
      `""` for a full window, else e.g. `"  (averages of the 3 steps since the resume at step
      27)"` or `"  (averages of the last 2 steps)"`.
    """
    if steps >= log_every:
        return ""
    unit = "step" if steps == 1 else "steps"
    if step - steps == resumed_at and resumed_at % log_every:
        return f"  (averages of the {steps} {unit} since the resume at step {resumed_at})"
    return f"  (averages of the last {steps} {unit})"


class ProgressBar:
    """A one-line progress bar on a terminal's stderr; does nothing when not a terminal."""

    def __init__(self, total: int, stream=None, width: int = 30):
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.total = max(total, 1)
        self.width = width

    def update(self, step: int, text: str = "") -> None:
        if not self.enabled:
            return
        done = int(self.width * min(step, self.total) / self.total)
        bar = "#" * done + "-" * (self.width - done)
        self.stream.write(f"\r[{bar}] {step}/{self.total} {text}\x1b[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write("\n")
            self.stream.flush()


# ----------------------------------------------------------------------------- results
def write_results(workdir: str | os.PathLike, results: Mapping[str, Any]) -> tuple[Path, Path]:
    """Writes `results.json` and a readable `results.md` table into `workdir`."""
    workdir = Path(workdir)
    json_path, md_path = workdir / "results.json", workdir / "results.md"
    write_json_atomic(json_path, dict(results))
    md_path.write_text(results_markdown(results))
    return json_path, md_path


def _headline(results: Mapping[str, Any], step_label: str) -> list[tuple[str, Any]]:
    """`(label, value)` of a run's headline numbers (results.md and the final table)."""
    return [
        ("test accuracy", _pct(results.get("test_accuracy"), results.get("test_ci95"))),
        ("test episodes", results.get("test_episodes")),
        ("best validation accuracy", _pct(results.get("best_validation_accuracy"))),
        (step_label, results.get("evaluated_step")),
        ("steps", results.get("steps")),
        ("wall time", _dur(results.get("wall_time_s"))),
        ("episodes/s", _num(results.get("episodes_per_s"))),
    ]


def results_markdown(results: Mapping[str, Any]) -> str:
    """A Markdown summary: headline numbers, then the configuration and versions."""
    lines = ["# Results", ""]
    headline = _headline(results, "checkpoint evaluated (step)")
    headline.append(
        ("devices / processes", f"{results.get('devices')} / {results.get('processes')}")
    )
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in headline if v is not None]
    for title, key in (("Configuration", "config"), ("Library versions", "versions")):
        section = results.get(key)
        if isinstance(section, Mapping):
            lines += ["", f"## {title}", "", "| | |", "|---|---|"]
            lines += [f"| {k} | {section[k]} |" for k in sorted(section)]
    return "\n".join(lines) + "\n"


def final_table(results: Mapping[str, Any]) -> str:
    """The few lines printed at the end of a run."""
    rows = _headline(results, "evaluated checkpoint (step)")
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def _pct(value, ci=None):
    if value is None:
        return None
    text = f"{100 * value:.2f}%"
    return text if ci is None else f"{text} +- {100 * ci:.2f} (95% CI)"


def _dur(value):
    return None if value is None else f"{format_duration(value)} ({value:.0f} s)"


def _num(value):
    return None if value is None else f"{value:.2f}"


# ----------------------------------------------------------------------------- plots
def _pyplot():
    """matplotlib.pyplot on the Agg backend, or None (with a one-line notice) without it."""
    try:
        import matplotlib
    except ImportError:
        _notice_once("matplotlib", "matplotlib is not installed: no plots are drawn")
        return None

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_learning_curve(
    records: Sequence[Mapping[str, Any]], path: str | os.PathLike
) -> Path | None:
    """Training loss and train/validation accuracy against the step, as a PNG (None and no
    file without matplotlib)."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))

    def series(name):
        pts = [(r["step"], r[name]) for r in records if name in r]
        return ([p[0] for p in pts], [p[1] for p in pts]) if pts else None

    if (s := series("loss")) is not None:
        ax_loss.plot(*s, label="train loss")
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("loss (summed query cross-entropy)")
    ax_loss.set_title("training loss")
    for name, label in (("accuracy", "train"), ("validation_accuracy", "validation")):
        if (s := series(name)) is not None:
            ax_acc.plot(*s, label=label, marker="o" if name.startswith("val") else None)
    ax_acc.set_xlabel("step")
    ax_acc.set_ylabel("accuracy")
    ax_acc.set_title("accuracy")
    ax_acc.legend(loc="lower right")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_attention(
    attention: np.ndarray,
    support_x: np.ndarray,
    support_y: np.ndarray,
    query_x: np.ndarray,
    query_y: np.ndarray,
    path: str | os.PathLike,
    *,
    max_queries: int = 10,
) -> Path | None:
    """The memory read of one episode: softmax attention of queries over the support set.

    Args:
      attention: `[L, N]` attention weights (rows sum to 1).
      support_x: `[N, H, W, C]` support images (memory slots), `support_y` `[N]` labels.
      query_x: `[L, H, W, C]` query images, `query_y` `[L]` labels.
      path: the PNG to write.
      max_queries: rows shown (spread over the query set).
    """
    plt = _pyplot()
    if plt is None:
        return None
    attention = np.asarray(attention, np.float32)
    n_q, n_s = attention.shape
    rows = np.unique(np.linspace(0, n_q - 1, min(max_queries, n_q)).round().astype(int))
    cell = 0.7
    fig = plt.figure(figsize=(cell * (n_s + 2) + 1.5, cell * (len(rows) + 1) + 1))
    grid = fig.add_gridspec(len(rows) + 1, n_s + 2, width_ratios=[1] * (n_s + 1) + [0.3])

    def show(ax, img, title=None):
        ax.imshow(np.asarray(img)[..., 0] if img.shape[-1] == 1 else img, cmap="gray_r")
        ax.set_xticks([])
        ax.set_yticks([])
        if title is not None:
            ax.set_title(title, fontsize=7)

    for j in range(n_s):
        show(fig.add_subplot(grid[0, j + 1]), support_x[j], f"slot {j}\nlabel {support_y[j]}")
    heat = fig.add_subplot(grid[1:, 1 : n_s + 1])
    vmax = float(attention[rows].max())  # softmax over cosines is flat: scale to the data
    im = heat.imshow(attention[rows], cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto")
    for r, q in enumerate(rows):
        ax = fig.add_subplot(grid[r + 1, 0])
        pred = int(np.argmax(attention[q]))
        show(ax, query_x[q])
        ax.set_ylabel(f"y={query_y[q]}\nmax:{support_y[pred]}", fontsize=6, rotation=0, labelpad=18)
        for j in range(n_s):
            heat.text(j, r, f"{attention[q, j]:.2f}", ha="center", va="center", fontsize=6,
                      color="white" if attention[q, j] < 0.6 * vmax else "black")  # fmt: skip
    heat.set_xticks([])
    heat.set_yticks([])
    fig.colorbar(im, cax=fig.add_subplot(grid[1:, n_s + 1]), label="attention weight")
    fig.suptitle("memory read: softmax(cosine(query key, support keys))", fontsize=9)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def plot_curve(
    xs: Sequence[float],
    ys: Sequence[float],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str,
    baseline: float | None = None,
) -> Path | None:
    """A single curve (e.g. continual learning), with an optional horizontal baseline."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(xs, ys, marker="o")
    if baseline is not None:
        ax.axhline(baseline, color="gray", linestyle="--", label="before")
        ax.legend()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
