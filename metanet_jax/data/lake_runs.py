"""Reader of Lake et al.'s one-shot classification runs (20-way 1-shot, 20 runs)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np

from metanet_jax.data._common import strokes_to_ink
from metanet_jax.types import Episode

_RUN = re.compile(r"run\d+$")


def _read_grey(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("L"), dtype=np.uint8)


def _ink(paths: list[Path], size: int) -> np.ndarray:
    grey = [_read_grey(p) for p in paths]
    shapes = {g.shape for g in grey}
    if len(shapes) != 1:
        raise ValueError(f"Images of one run differ in size: {sorted(shapes)}.")
    x = strokes_to_ink(np.stack(grey), size)  # [n, size, size, 1] uint8, ink 255
    return x.astype(np.float32) / 255.0


def load_lake_runs(folder: str | os.PathLike, *, size: int = 28) -> list[tuple[Episode, Episode]]:
    """Reads Lake's one-shot runs: one N-way 1-shot episode per run (N = 20 in the original).

    Layout: `folder/runNN/training/classKK.png` (one example per class),
    `folder/runNN/test/itemMM.png` (the queries) and `folder/runNN/class_labels.txt` with
    lines `runNN/test/itemMM.png runNN/training/classKK.png`. Images get Omniglot's
    preprocessing (grey, inverted so ink = 1, area-resized to `size`).

    Args:
      folder: the folder holding the `runNN` folders.
      size: output height and width.

    Returns:
      One `(support, query)` pair per run, runs in name order. support: x `[N, size, size, 1]`
      float32 in [0, 1], y `[N]` int32 = `arange(N)` with label `k` for the `k`-th training
      file in name order (`class01` -> 0); query: x `[M, size, size, 1]` for the test items
      in name order, y `[M]` their labels from `class_labels.txt`. Stack them with
      `jax.tree.map(lambda *a: np.stack(a), *pairs)` for `[runs, ...]` arrays.

    Raises:
      FileNotFoundError: no such folder, no `runNN` folder in it, or a file a run names is
        missing.
      ValueError: a malformed `class_labels.txt`.
    """
    root = Path(folder).expanduser()
    runs = (
        sorted(p for p in root.iterdir() if p.is_dir() and _RUN.match(p.name))
        if (root.is_dir())
        else []
    )
    if not runs:
        raise FileNotFoundError(
            f"Lake runs: no runNN folders in {root} (expected runNN/training/classKK.png, "
            "runNN/test/itemMM.png, runNN/class_labels.txt; the data is in "
            "https://github.com/brendenlake/omniglot, python/one-shot-classification)."
        )
    return [_read_run(run, size) for run in runs]


def _read_run(run: Path, size: int) -> tuple[Episode, Episode]:
    """One run's `(support, query)` (`load_lake_runs`)."""
    labels_file = run / "class_labels.txt"
    train = sorted((run / "training").glob("*.png"))
    if not labels_file.is_file() or not train:
        raise FileNotFoundError(f"Lake runs: {run} needs class_labels.txt and training/*.png.")
    label_of = {p.name: i for i, p in enumerate(train)}
    pairs = []
    for line_no, line in enumerate(labels_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 2:
            raise ValueError(f"{labels_file}:{line_no}: expected 2 paths, got {line!r}.")
        item, cls = (Path(f) for f in fields)
        if cls.name not in label_of:
            raise FileNotFoundError(f"{labels_file}:{line_no}: no training image {cls.name}.")
        pairs.append((run / "test" / item.name, label_of[cls.name]))
    pairs.sort(key=lambda p: p[0].name)
    missing = [str(p) for p, _ in pairs if not p.is_file()]
    if missing or not pairs:
        raise FileNotFoundError(f"Lake runs: missing test images in {run}: {missing}.")
    support = Episode(_ink(train, size), np.arange(len(train), dtype=np.int32))
    query = Episode(_ink([p for p, _ in pairs], size), np.asarray([y for _, y in pairs], np.int32))
    return support, query
