"""Reader of mini-ImageNet (Ravi & Larochelle's split CSVs), resized to 84x84 RGB and cached.

The split (Ravi & Larochelle, ICLR 2017; the CSV files of github.com/twitter/meta-learning-lstm,
`data/miniImagenet/`): 64 training, 16 validation and 20 test classes of 600 images each.
`split_info` reports a folder's CSV files (SHA-256, classes, images per class) and whether
they have that shape; `load_mini_imagenet` logs it and warns when they do not.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from metanet_jax.data._common import CACHE_VERSION, ClassImages
from metanet_jax.data._common import data_dir as _data_dir

_CSV = {"train": "train.csv", "val": "val.csv", "validation": "val.csv", "test": "test.csv"}

# Ravi & Larochelle's split: classes per split file, images per class.
SPLIT_CLASSES = {"train": 64, "val": 16, "test": 20}
IMAGES_PER_CLASS = 600

# SHA-256 of the CSV files as published, to recognise them. Deliberately empty: the published
# files were not available where this was written (no network), and a checksum that was not
# computed from them must not stand here. Fill in `sha256sum train.csv val.csv test.csv` of
# the files from github.com/twitter/meta-learning-lstm; until then `split_info` reports the
# checksum of whatever files are used (runs record it in config.json) and `published_sha256`
# as None.
PUBLISHED_SHA256: dict[str, str] = {}


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if rows and rows[0][:2] == ["filename", "label"]:
        rows = rows[1:]
    bad = [r for r in rows if len(r) != 2]
    if bad or not rows:
        raise ValueError(f"{path}: expected `filename,label` rows, got {bad[:1] or 'none'}.")
    return [(r[0], r[1]) for r in rows]


def _split_name(split: str) -> str:
    if split not in _CSV:
        raise ValueError(f"Unknown mini-ImageNet split {split!r}; expected one of {tuple(_CSV)}.")
    return "val" if split == "validation" else split


def split_info(folder: str | os.PathLike, split: str) -> dict[str, Any]:
    """What a folder's CSV file of one split holds, against Ravi & Larochelle's split.

    Args:
      folder: the data set's folder (`folder/{train,val,test}.csv`).
      split: `"train"`, `"val"` (or `"validation"`) or `"test"`.

    Returns:
      `{"file", "sha256", "classes", "images", "min_per_class", "max_per_class",
      "published_sha256", "standard"}`: `published_sha256` is the published file's checksum
      (`None`: not known, see `PUBLISHED_SHA256`); `standard` is whether the classes and
      images per class are Ravi & Larochelle's (64/16/20 classes of 600 images) and the
      checksum matches the published one when that is known.

    Raises:
      FileNotFoundError: no such CSV file. ValueError: unknown split or a malformed CSV.
    """
    name = _split_name(split)
    path = Path(folder).expanduser().resolve() / _CSV[name]
    if not path.is_file():
        raise FileNotFoundError(f"mini-ImageNet: {path} not found.")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    rows = _read_csv(path)
    counts: dict[str, int] = {}
    for _, label in rows:
        counts[label] = counts.get(label, 0) + 1
    published = PUBLISHED_SHA256.get(name)
    shape_ok = len(counts) == SPLIT_CLASSES[name] and set(counts.values()) == {IMAGES_PER_CLASS}
    return {
        "file": _CSV[name],
        "sha256": digest,
        "classes": len(counts),
        "images": len(rows),
        "min_per_class": min(counts.values()),
        "max_per_class": max(counts.values()),
        "published_sha256": published,
        "standard": shape_ok and (published is None or published == digest),
    }


def _log_split_info(info: dict[str, Any], name: str) -> None:
    log = logging.getLogger(__name__)
    log.info(
        "mini-ImageNet %s: sha256 %s, %d classes, %d-%d images per class",
        info["file"], info["sha256"], info["classes"], info["min_per_class"],
        info["max_per_class"],
    )  # fmt: skip
    if info["published_sha256"] is not None and info["published_sha256"] != info["sha256"]:
        log.warning(
            "mini-ImageNet %s: sha256 %s differs from the published file's %s",
            info["file"], info["sha256"], info["published_sha256"],
        )  # fmt: skip
    elif not info["standard"]:
        log.warning(
            "mini-ImageNet %s: %d classes of %d-%d images, not Ravi & Larochelle's %d classes "
            "of %d images", info["file"], info["classes"], info["min_per_class"],
            info["max_per_class"], SPLIT_CLASSES[name], IMAGES_PER_CLASS,
        )  # fmt: skip


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
    the folder's absolute path, the CSV's contents and `size`. On the first load (no cache
    yet) the CSV's SHA-256 and class counts are logged, with a warning when they are not Ravi
    & Larochelle's (`split_info`).

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
    split_name = _split_name(split)
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
    _log_split_info(split_info(root, split_name), split_name)
    images_dir = root / "images" if (root / "images").is_dir() else root
    missing = [f for f, _ in rows if not (images_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"mini-ImageNet: {len(missing)} image(s) of {csv_path.name} missing in {images_dir}, "
            f"e.g. {missing[:3]}."
        )
    result = _decode(rows, images_dir, size)
    result.save(cache)
    return result


def _decode(rows: list[tuple[str, str]], images_dir: Path, size: int) -> ClassImages:
    """The CSV rows' images as RGB `size` x `size` (PIL's BOX filter), classes in label order,
    each truncated to the smallest class's count (`load_mini_imagenet`)."""
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
    return ClassImages(
        images=out,
        alphabets=np.asarray(["mini-imagenet"] * len(labels)),
        characters=np.asarray(labels),
        class_ids=np.arange(len(labels), dtype=np.int64),
        counts=counts,
    )
