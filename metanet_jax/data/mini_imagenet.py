"""Reader of mini-ImageNet (Ravi & Larochelle's split CSVs), resized to 84x84 RGB and cached."""

from __future__ import annotations

import csv
import hashlib
import os
from pathlib import Path

import numpy as np

from metanet_jax.data._common import CACHE_VERSION, ClassImages
from metanet_jax.data._common import data_dir as _data_dir

_CSV = {"train": "train.csv", "val": "val.csv", "validation": "val.csv", "test": "test.csv"}


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][:2] == ["filename", "label"]:
        rows = rows[1:]
    bad = [r for r in rows if len(r) != 2]
    if bad or not rows:
        raise ValueError(f"{path}: expected `filename,label` rows, got {bad[:1] or 'none'}.")
    return [(r[0], r[1]) for r in rows]


def load_mini_imagenet(
    folder: str | os.PathLike,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    size: int = 84,
) -> ClassImages:
    """Reads one split of mini-ImageNet: images plus Ravi & Larochelle's CSV files.

    Layout: `folder/{train,val,test}.csv` (header `filename,label`) and the images in
    `folder/images/<filename>` (or `folder/<filename>`). Each image is converted to RGB and
    resized to `size` x `size` with PIL's BOX filter (area averaging, i.e. antialiased).
    The result is cached as `<data_dir>/cache/mini_imagenet_<split>_<key>.npz`, `key` a hash of
    the folder's absolute path, the CSV's contents and `size`.

    Args:
      folder: the data set's folder.
      split: `"train"`, `"val"` (or `"validation"`) or `"test"`.
      data_dir: writable cache folder, default `$METANET_DATA_DIR` or
        `~/.cache/metanet_jax/data`.
      size: output height and width.

    Returns:
      `ClassImages` with images `[classes, n, size, size, 3]` uint8, classes in label order,
      `n` the smallest class's count (600 in the original splits), the first `n` rows of
      each class in CSV order; `characters` holds the labels (WordNet ids).

    Raises:
      FileNotFoundError: no such folder, CSV or image (all checked before any decoding).
      ValueError: unknown split or a malformed CSV.
    """
    if split not in _CSV:
        raise ValueError(f"Unknown mini-ImageNet split {split!r}; expected one of {tuple(_CSV)}.")
    root = Path(folder).expanduser().resolve()
    csv_path = root / _CSV[split]
    if not csv_path.is_file():
        raise FileNotFoundError(
            f"mini-ImageNet: {csv_path} not found (expected {root}/train.csv, val.csv, test.csv "
            f"and {root}/images/*.jpg, from Ravi & Larochelle's split)."
        )
    key = hashlib.sha256(
        f"{root}|{size}|{CACHE_VERSION}|".encode() + csv_path.read_bytes()
    ).hexdigest()[:16]
    name = "validation" if split == "val" else split
    cache = _data_dir(data_dir) / "cache" / f"mini_imagenet_{name}_{key}.npz"
    if cache.is_file():
        return ClassImages.load(cache)
    rows = _read_csv(csv_path)
    images_dir = root / "images" if (root / "images").is_dir() else root
    missing = [f for f, _ in rows if not (images_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"mini-ImageNet: {len(missing)} image(s) of {csv_path.name} missing in {images_dir}, "
            f"e.g. {missing[:3]}."
        )
    from PIL import Image

    labels = sorted({label for _, label in rows})
    by_label: dict[str, list[str]] = {label: [] for label in labels}
    for f, label in rows:
        by_label[label].append(f)
    counts = np.asarray([len(by_label[label]) for label in labels], np.int64)
    n = int(counts.min())
    out = np.empty((len(labels), n, size, size, 3), np.uint8)
    for c, label in enumerate(labels):
        for i, f in enumerate(by_label[label][:n]):
            with Image.open(images_dir / f) as img:
                out[c, i] = np.asarray(img.convert("RGB").resize((size, size), Image.BOX))
    result = ClassImages(
        images=out,
        alphabets=np.asarray(["mini-imagenet"] * len(labels)),
        characters=np.asarray(labels),
        class_ids=np.arange(len(labels), dtype=np.int64),
        counts=counts,
    )
    result.save(cache)
    return result
