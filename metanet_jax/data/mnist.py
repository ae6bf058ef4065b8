"""MNIST through TensorFlow Datasets' stock `mnist` builder, grouped by class and cached."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metanet_jax.data import _common
from metanet_jax.data._common import ClassImages, prepared_builder, require_download, sha256

# The stock builder's files and sha256 (TFDS's mnist checksums.tsv); the local copies in
# ../shared/datasets/mnist are byte-exact, so TFDS's own checksum check applies unchanged.
MNIST_FILES: dict[str, str] = {
    "train-images-idx3-ubyte.gz": (
        "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"
    ),
    "train-labels-idx1-ubyte.gz": (
        "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"
    ),
    "t10k-images-idx3-ubyte.gz": (
        "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"
    ),
    "t10k-labels-idx1-ubyte.gz": (
        "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"
    ),
}
_HOW = (
    "Get them from https://storage.googleapis.com/cvdf-datasets/mnist/ (the files TFDS "
    "downloads), or unset METANET_DATASETS and pass no manual_dir to let TFDS download them."
)
SPLITS = ("train", "test")
# Where TFDS's stock builder downloads the files (its `_MNIST_URL`; a test compares them).
DOWNLOAD_URL = "https://storage.googleapis.com/cvdf-datasets/mnist/"


def _group(images: np.ndarray, labels: np.ndarray) -> ClassImages:
    counts = np.bincount(labels, minlength=10)
    n = int(counts.min())
    per_class = [images[labels == c][:n] for c in range(10)]  # record order within a class
    return ClassImages(
        images=np.stack(per_class),
        alphabets=np.asarray(["mnist"] * 10),
        characters=np.asarray([str(c) for c in range(10)]),
        class_ids=np.arange(10, dtype=np.int64),
        counts=counts.astype(np.int64),
    )


def load_mnist(
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, ClassImages]:
    """MNIST as 10 classes per split, truncated to the smallest class.

    Prepared once with TFDS (needs TensorFlow) and cached as
    `<data_dir>/cache/mnist_<split>_v2.npz`.

    Args:
      manual_dir: folder with the four `.gz` files (or the folder holding `mnist/`); default
        `$METANET_DATASETS/mnist`; with neither, TFDS downloads them.
      data_dir: writable folder, default `$METANET_DATA_DIR` or `~/.cache/metanet_jax/data`.

    Returns:
      `{"train", "test"}: ClassImages`, images `[10, n, 28, 28, 1]` uint8 (bright ink, as in
      MNIST) with `n` the smallest class's count (train 5421, the digit 5; test 892, the digit
      5), the first `n` of each class in TFDS's record order; `counts` holds the per-class
      counts before truncation (sum 60000 / 10000).

    Raises:
      FileNotFoundError: a configured local folder or one of the four files is missing.
      DataUnavailable: (a `FileNotFoundError`) no local folder and no network: TFDS's
        download host does not answer (`_common.require_download`; nothing is written).
      ValueError: a local file whose sha256 is not MNIST's.
    """
    root = _common.data_dir(data_dir)
    paths = {s: _common.cache_path(root, f"mnist_{s}") for s in SPLITS}
    if all(p.is_file() for p in paths.values()):
        return {s: ClassImages.load(p) for s, p in paths.items()}
    folder = _common.local_folder(manual_dir, "mnist")
    if folder is not None:
        _common.require_files(folder, list(MNIST_FILES), "MNIST", _HOW)
        for name, expected in MNIST_FILES.items():
            if (digest := sha256(folder / name)) != expected:
                raise ValueError(
                    f"MNIST: {folder / name} has sha256 {digest}, expected {expected} "
                    f"(corrupt file). {_HOW}"
                )
    else:
        files = list(MNIST_FILES)
        how = "Get them from https://storage.googleapis.com/cvdf-datasets/mnist/ (docs/DATA.md)."
        require_download("MNIST", DOWNLOAD_URL + files[0], "mnist", files, how)
    with _common.preparation_lock(root):
        if all(p.is_file() for p in paths.values()):  # prepared by another process meanwhile
            return {s: ClassImages.load(p) for s, p in paths.items()}
        return _prepare(folder, root, paths)


def _prepare(folder: Path | None, root: Path, paths: dict[str, Path]) -> dict[str, ClassImages]:
    """Prepares MNIST with TFDS (needs TensorFlow) and writes the cache."""
    progress = _common.PreparationProgress("MNIST", stages=1 + len(SPLITS))
    source = "TFDS's download" if folder is None else folder
    progress.stage(f"preparing from {source} with TFDS (once; later runs read the cache)")
    out = {}
    with prepared_builder(root, folder, "mnist") as (tfds, builder):
        for split in SPLITS:
            progress.stage(f"grouping the {split} split by digit")
            ds = builder.as_dataset(split=split, shuffle_files=False, batch_size=-1)
            arrays = tfds.as_numpy(ds)
            out[split] = _group(arrays["image"], arrays["label"].astype(np.int64))
            out[split].save(paths[split])
    progress.finish(f"cached in {', '.join(str(paths[s]) for s in SPLITS)}")
    return out
