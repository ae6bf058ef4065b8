"""Shared pieces of the data package: folders, the `ClassImages` container, preprocessing,
the on-disk cache, and a quiet TFDS preparation. Nothing here imports TensorFlow at import."""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import os
import shutil
import sys
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

DATASETS_ENV = "METANET_DATASETS"
DATA_DIR_ENV = "METANET_DATA_DIR"
CACHE_VERSION = 2  # bump when preprocessing changes: old cache files are then ignored


class ClassImages(NamedTuple):
    """Images grouped by class: the input of `sample_episodes`.

    Attributes:
      images: `[classes, per_class, H, W, C]` uint8. Omniglot and MNIST: `[.., 28, 28, 1]` with
        ink as 255 and background as 0 (the sampler maps them to 1.0 and 0.0).
      alphabets: `[classes]` str, the alphabet of each class (`"mnist"` for MNIST).
      characters: `[classes]` str, a unique name per class (`"Alphabet/character05"`, `"7"`).
      class_ids: `[classes]` int64, a global id per class (Omniglot: the character id in 0..1622
        from the file names; MNIST: the digit).
      counts: `[classes]` int64, examples of the class in the source before truncation to the
        smallest class (Omniglot: 20 everywhere).
    """

    images: np.ndarray
    alphabets: np.ndarray
    characters: np.ndarray
    class_ids: np.ndarray
    counts: np.ndarray

    @property
    def num_classes(self) -> int:
        return int(self.images.shape[0])

    def select(self, index: np.ndarray) -> ClassImages:
        """The classes at `index` (an int array or boolean mask over classes), in that order."""
        return ClassImages(*(np.asarray(f)[index] for f in self))

    def save(self, path: Path) -> None:
        """Writes an uncompressed `.npz` atomically (a temporary file, then a rename)."""
        atomic_savez(path, **self._asdict())

    @classmethod
    def load(cls, path: Path) -> ClassImages:
        with np.load(path, allow_pickle=False) as f:
            return cls(**{k: f[k] for k in cls._fields})


def cache_path(root: Path, name: str) -> Path:
    """The cache file of a prepared data set: `<root>/cache/<name>_v<CACHE_VERSION>.npz`."""
    return root / "cache" / f"{name}_v{CACHE_VERSION}.npz"


def data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The writable folder for everything this package writes.

    `data_dir` if given, else `$METANET_DATA_DIR`, else `$XDG_CACHE_HOME/metanet_jax/data`
    (`~/.cache/metanet_jax/data`). Not created here.
    """
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(cache).expanduser() / "metanet_jax" / "data"


def datasets_dir() -> Path | None:
    """`$METANET_DATASETS` (the read-only folder holding `omniglot/` and `mnist/`), or None."""
    value = os.environ.get(DATASETS_ENV)
    return Path(value).expanduser() if value else None


def local_folder(manual_dir: str | os.PathLike | None, name: str) -> Path | None:
    """The folder of local archives for data set `name`, or None for TFDS's normal download.

    `manual_dir` may be the data set's own folder or the folder holding `<name>/`; without it
    `$METANET_DATASETS/<name>` is used. A configured folder that does not exist is an error,
    never a silent fallback to the network.
    """
    if manual_dir is not None:
        folder = Path(manual_dir).expanduser()
        if (folder / name).is_dir():
            folder = folder / name
    elif (root := datasets_dir()) is not None:
        folder = root / name
    else:
        return None
    if not folder.is_dir():
        raise FileNotFoundError(
            f"{name}: local data folder {folder} does not exist (from manual_dir or "
            f"${DATASETS_ENV}). Point it at a folder holding the {name} archives, or unset "
            f"${DATASETS_ENV} to let TFDS download them."
        )
    return folder


class DataUnavailable(FileNotFoundError):
    """A data set is neither cached, nor in a local folder, nor downloadable from here.

    Raised by `require_download` before TFDS starts its downloader: no `manual_dir`, no
    `$METANET_DATASETS`, and the download host cannot be reached (no network, or a name
    that does not resolve). The message names `$METANET_DATASETS` (the programs'
    `--datasets`) and the files expected there. A `FileNotFoundError`, so that the programs
    report it in one line like the other missing-file errors.
    """


# Seconds to wait for the download host before calling the data set unreachable.
PROBE_TIMEOUT_S = 10.0


def require_download(what: str, url: str, subdir: str, files: list[str], how: str) -> None:
    """Checks, before TFDS's downloader starts, that `url`'s host answers at all.

    The check is one HTTP `HEAD` request through `requests` (TFDS's own HTTP library, so the
    same proxy settings, `HTTPS_PROXY` etc., apply). Any answer, even an HTTP error status,
    means there is a network and TFDS's normal download goes ahead (its own errors then
    stand). No answer (the name does not resolve, the connection is refused, or nothing
    within `PROBE_TIMEOUT_S` seconds) raises `DataUnavailable` at once, instead of TFDS's
    retries and a long traceback ending in `requests.exceptions.ConnectionError`.

    Args:
      what: the data set's name in the message, e.g. "Omniglot".
      url: one file TFDS would download.
      subdir: the folder under `$METANET_DATASETS` that would hold the files.
      files: the file names expected there.
      how: where to get them (one sentence).

    Raises:
      DataUnavailable: the host cannot be reached.
    """
    try:
        import requests
    except ImportError:  # pragma: no cover - a TFDS dependency; TFDS reports it itself
        return
    try:
        requests.head(url, timeout=PROBE_TIMEOUT_S, allow_redirects=False).close()
    except requests.RequestException as e:
        # requests wraps urllib3's error, whose `reason` is the cause (e.g. the name lookup).
        inner = getattr(e.args[0], "reason", e.args[0]) if e.args else e
        reason = " ".join(f"{type(inner).__name__}: {inner}".split())
        if len(reason) > 160:
            reason = reason[:160] + "..."
        host = urllib.parse.urlsplit(url).hostname
        raise DataUnavailable(
            f"{what}: not cached, no local folder given, and TFDS cannot download it from here "
            f"({host} does not answer: {reason}). Set ${DATASETS_ENV} (the programs' "
            f"--datasets, the loaders' manual_dir=) to a folder holding {subdir}/ with "
            f"{', '.join(files)}. {how}"
        ) from None


def require_files(folder: Path, names: list[str], what: str, how: str) -> None:
    """Raises FileNotFoundError naming the folder and every missing file, before any work."""
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{what}: missing file(s) {', '.join(missing)} in {folder} "
            f"(expected: {', '.join(names)}). {how}"
        )


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """`np.savez` to a temporary name in the same folder, then an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def preparation_lock(root: Path) -> Iterator[None]:
    """Holds an exclusive inter-process lock on preparing data into `root`.

    Two processes preparing the same TFDS folder at once collide (TFDS moves its
    `incomplete.*` folders into place and each extraction is shared): the second one waits
    here, then finds the cache the first one wrote. The lock file sits beside `root`
    (`.<root name>.lock`), so `root` itself is created only by the preparation and removed
    by `cleanup_on_error` if it fails. No lock where `fcntl` is missing (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not on POSIX
        yield
        return
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger(__name__).info(
                "waiting for another process preparing data in %s", root
            )
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def cleanup_on_error(root: Path, *subdirs: Path) -> Iterator[None]:
    """Removes what the body created under `root`/`subdirs` if it raises.

    Entries that existed before are kept, so a failed preparation never leaves a half-written
    download, extraction or TFDS folder behind and a later run starts clean.
    """
    root_existed = root.exists()
    before = {d: set(d.iterdir()) if d.is_dir() else None for d in subdirs}
    try:
        yield
    except BaseException:
        if not root_existed:
            shutil.rmtree(root, ignore_errors=True)
        else:
            for d, old in before.items():
                if old is None:
                    shutil.rmtree(d, ignore_errors=True)
                elif d.is_dir():
                    for p in set(d.iterdir()) - old:
                        if p.is_dir():
                            shutil.rmtree(p, ignore_errors=True)
                        else:
                            p.unlink(missing_ok=True)
        raise


def _area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """`[n_out, n_in]` weights of exact area averaging (box filter with fractional overlap)."""
    scale = n_in / n_out
    lo = np.arange(n_out)[:, None] * scale
    hi = lo + scale
    j = np.arange(n_in)[None, :]
    overlap = np.clip(np.minimum(hi, j + 1) - np.maximum(lo, j), 0.0, None)
    return (overlap / scale).astype(np.float32)


def area_resize(images: np.ndarray, size: int, *, chunk: int = 2048) -> np.ndarray:
    """Area-averaging resize of grey images (each output pixel = mean over its input area).

    Args:
      images: `[N, h, w]` float32 or uint8 grey images.
      size: output height and width.
      chunk: images per matrix product (bounds the float32 memory).

    Returns:
      `[N, size, size]` float32 (same value range as the input).
    """
    n, h, w = images.shape
    rows, cols = _area_matrix(h, size), _area_matrix(w, size)
    out = np.empty((n, size, size), np.float32)
    for s in range(0, n, chunk):
        x = images[s : s + chunk].astype(np.float32)
        out[s : s + chunk] = np.einsum("ih,nhw,jw->nij", rows, x, cols, optimize=True)
    return out


def strokes_to_ink(grey: np.ndarray, size: int = 28) -> np.ndarray:
    """Dark-strokes-on-white grey images to ink images: invert, then area-resize.

    Inverting first makes ink 1 and background 0 before any filtering, so the resize averages
    ink over each output pixel's area and thin strokes survive as grey values.

    Args:
      grey: `[N, h, w]` uint8, 0 = stroke, 255 = background (Omniglot's PNGs, Lake's runs).
      size: output height and width.

    Returns:
      `[N, size, size, 1]` uint8, ink = 255 and background = 0.
    """
    ink = 255.0 - grey.astype(np.float32)
    small = area_resize(ink, size)
    return np.clip(np.rint(small), 0, 255).astype(np.uint8)[..., None]


# ----------------------------------------------------------------------------- quiet TFDS
def import_tfds():
    """Imports TensorFlow Datasets for a preparation, with TensorFlow's C++ log at errors.

    Before TensorFlow loads (only then do they count): `TF_CPP_MIN_LOG_LEVEL=2` (errors
    still print) and `TF_ENABLE_ONEDNN_OPTS=0` (TensorFlow then prints no oneDNN notice;
    the preparation only decodes PNGs, integer work that oneDNN does not change). Values
    already in the environment are kept.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow_datasets as tfds

    return tfds


class _DropInfo(logging.Filter):
    """Drops INFO (and DEBUG) records logged from files under the given package folders."""

    def __init__(self, folders: tuple[str, ...]):
        super().__init__()
        self.folders = folders

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        return not any(f in record.pathname for f in self.folders)


@contextlib.contextmanager
def quiet_tfds(tfds) -> Iterator[None]:
    """TFDS's work without its noise: no tqdm bars (tens of thousands of lines in a log
    file), no INFO records, its stdout prints captured. Warnings and errors still pass; if
    the body raises, the captured prints are written to stderr before the error propagates.
    """
    from tensorflow_datasets.core.utils import tqdm_utils

    was_active = getattr(tqdm_utils, "_active", True)
    tfds.display_progress_bar(False)
    drop = _DropInfo(("/tensorflow_datasets/", "/tensorflow/"))
    loggers = [logging.getLogger("absl"), logging.getLogger("tensorflow")]
    for lg in loggers:
        lg.addFilter(drop)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured):
            yield
    except BaseException:
        sys.stderr.write(captured.getvalue())
        raise
    finally:
        for lg in loggers:
            lg.removeFilter(drop)
        tfds.display_progress_bar(was_active)


@contextlib.contextmanager
def prepared_builder(
    root: Path, folder: Path | None, builder_name: str, config: str | None = None
) -> Iterator[tuple[Any, Any]]:
    """A TFDS builder downloaded and prepared under `root`: yields `(tfds, builder)`.

    TFDS's folder is `root/tfds`, its downloads and extractions go to
    `root/downloads/<builder_name>` (one folder per builder: TFDS names extractions by file
    name, and the original and rebuilt Omniglot zips share file names). The preparation and
    the body (reading the data, writing the cache under `root/cache`) run quietly
    (`quiet_tfds`) and inside one `cleanup_on_error`, so that a failure anywhere leaves
    nothing half-written behind.

    Args:
      root: the data folder (`data_dir`).
      folder: local archives (TFDS's `manual_dir`), or `None` for TFDS's download.
      builder_name: the registered builder.
      config: the builder's config, or `None`.
    """
    tfds = import_tfds()
    tfds_dir, downloads = root / "tfds", root / "downloads" / builder_name
    watched = (tfds_dir, tfds_dir / builder_name, downloads.parent, downloads, root / "cache")
    with cleanup_on_error(root, *watched), quiet_tfds(tfds):
        name = builder_name if config is None else f"{builder_name}/{config}"
        builder = tfds.builder(name, data_dir=os.fspath(tfds_dir))
        download_config = tfds.download.DownloadConfig(
            manual_dir=None if folder is None else os.fspath(folder), try_download_gcs=False
        )
        builder.download_and_prepare(
            download_dir=os.fspath(downloads), download_config=download_config
        )
        yield tfds, builder


class PreparationProgress:
    """What a data preparation reports of itself, on stderr: one progress bar on a terminal,
    otherwise one line per stage (a few lines in a log file).

    Args:
      what: e.g. "Omniglot 'background'".
      stages: how many `stage` calls follow (the bar's length).
      stream: default `sys.stderr`.
    """

    def __init__(self, what: str, stages: int, stream=None):
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.what, self.stages, self.done = what, max(stages, 1), 0
        self.t0 = time.time()

    def _bar(self, text: str) -> None:
        width = 24
        filled = int(width * min(self.done, self.stages) / self.stages)
        bar = "#" * filled + "-" * (width - filled)
        self.stream.write(f"\r[{bar}] {self.what}: {text}\x1b[K")
        self.stream.flush()

    def stage(self, text: str) -> None:
        """A stage begins."""
        if self.tty:
            self._bar(text)
        else:
            self.stream.write(f"metanet_jax.data: {self.what}: {text}\n")
            self.stream.flush()
        self.done += 1

    def finish(self, text: str) -> None:
        """The preparation is done (`text` plus the elapsed time)."""
        self.done = self.stages
        line = f"{text} ({time.time() - self.t0:.0f} s)"
        if self.tty:
            self._bar(line)
            self.stream.write("\n")
        else:
            self.stream.write(f"metanet_jax.data: {self.what}: {line}\n")
        self.stream.flush()
