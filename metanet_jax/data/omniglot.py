"""Omniglot through TensorFlow Datasets (offline from local zips or TFDS's download), cached as
`[classes, 20, 28, 28, 1]` uint8 arrays, and the class-split schemes."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from metanet_jax.data._common import (
    ClassImages,
    PreparationProgress,
    cache_path,
    import_tfds,
    local_folder,
    preparation_lock,
    prepared_builder,
    require_download,
    require_files,
    sha256,
    strokes_to_ink,
)
from metanet_jax.data._common import (
    data_dir as _data_dir,
)

SPLIT_SCHEMES: tuple[str, ...] = ("standard", "previous", "small1", "small2", "small")
DEFAULT_VALIDATION_CLASSES = 100
DEFAULT_SPLIT_SEED = 0
DRAWERS = 20
NUM_BACKGROUND, NUM_EVALUATION, NUM_CHARACTERS = 964, 659, 1623
PREVIOUS_TRAIN_CLASSES = 1200  # Vinyals et al.: 1200 training, 423 test characters

PARTS: tuple[str, ...] = ("background", "evaluation", "small1", "small2")
ZIP_NAMES: dict[str, str] = {
    "background": "images_background.zip",
    "evaluation": "images_evaluation.zip",
    "small1": "images_background_small1.zip",
    "small2": "images_background_small2.zip",
}
# sha256 of the original zips (TFDS's url_checksums/omniglot.txt) and of the rebuilt full zips
# in ../shared/datasets/omniglot (same PNGs, different zip container; see docs/DATA.md).
_STOCK_SHA = {
    "images_background.zip": "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
    "images_evaluation.zip": "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
    "images_background_small1.zip": (
        "f38eb80f801274ac2b4dff5b24289016bfaba4a7d5bb50deebf27104ad6cb8a4"
    ),
    "images_background_small2.zip": (
        "3ccaa407515a8778e5d0861875af38b17e418f301ad5bb3b5a6b65d901a41c7f"
    ),
}
_REBUILT_SHA = {
    "images_background.zip": "9892d2170ed983d856e264844632d54814f01001b3731baa409c054caf292a5e",
    "images_evaluation.zip": "d2dff634dba4546a89a69750392f44ee03fd80d7a3ab19a71f0bc8d643652ede",
}
_HOW = (
    "Get them from https://github.com/brendenlake/omniglot/tree/master/python (the zips TFDS "
    "downloads), or unset METANET_DATASETS and pass no manual_dir to let TFDS download them."
)
_GET = "Get them from https://github.com/brendenlake/omniglot/tree/master/python (docs/DATA.md)."
# Where TFDS's stock builder downloads each zip (its `_DL_URLS`; a test compares them).
DOWNLOAD_URL = "https://github.com/brendenlake/omniglot/raw/master/python/"


def _parts_for(scheme: str, validation_classes: int) -> tuple[str, ...]:
    if scheme in ("standard", "previous"):
        return ("background", "evaluation")
    smalls = ("small1", "small2") if scheme == "small" else (scheme,)
    return smalls + ("evaluation",) + (("background",) if validation_classes > 0 else ())


def _cache_path(root: Path, part: str) -> Path:
    return cache_path(root, f"omniglot_{part}")


def _builder_name(folder: Path | None, part: str) -> str:
    """Checks a local zip (fail fast) and picks the builder whose checksums it matches."""
    if folder is None:
        return "metanet_omniglot"  # TFDS's normal download of the original zips
    name = ZIP_NAMES[part]
    digest = sha256(folder / name)
    if digest == _REBUILT_SHA.get(name):
        return "metanet_omniglot_rebuilt"
    if digest == _STOCK_SHA[name]:
        return "metanet_omniglot"
    accepted = " or ".join(filter(None, (_STOCK_SHA[name], _REBUILT_SHA.get(name))))
    raise ValueError(
        f"Omniglot: {folder / name} has sha256 {digest}, expected {accepted} (corrupt or "
        f"unknown file). {_HOW}"
    )


def _prepare_part(part: str, folder: Path | None, builder_name: str, root: Path) -> ClassImages:
    """Prepares one zip with TFDS (needs TensorFlow), preprocesses it and writes the cache."""
    progress = PreparationProgress(f"Omniglot {part!r}", stages=3)
    source = "TFDS's download" if folder is None else folder / ZIP_NAMES[part]
    progress.stage(f"preparing from {source} with TFDS (once; later runs read the cache)")
    import_tfds()  # before the builders' module imports TFDS (TensorFlow's log level)
    from metanet_jax.data import _tfds_builders  # noqa: F401  (registers the builders)

    with prepared_builder(root, folder, builder_name, part) as (tfds, builder):
        progress.stage("reading the drawings, resizing them to 28x28")
        ds = builder.as_dataset(split=builder.builder_config.split, shuffle_files=False)
        grey, labels, alphabets, char_ids = [], [], [], []
        for ex in tfds.as_numpy(ds.batch(2048)):
            grey.append(ex["image"][..., 0])  # {0, 255}, strokes are 0
            labels.append(ex["label"])
            alphabets.extend(a.decode() for a in ex["alphabet"])
            char_ids.append(ex["alphabet_char_id"])
        grey_all, label_all = np.concatenate(grey), np.concatenate(labels)
        if grey_all.max() <= 1:  # TFDS's TF-free reader gives {0, 1}; the TF reader {0, 255}
            grey_all = grey_all * np.uint8(255)
        char_all, alpha_all = np.concatenate(char_ids), np.asarray(alphabets)
        ids, first, counts = np.unique(label_all, return_index=True, return_counts=True)
        if not np.all(counts == DRAWERS):
            raise ValueError(f"Omniglot {part}: expected {DRAWERS} images per character.")
        order = np.argsort(label_all, kind="stable")  # class-major
        ink = strokes_to_ink(grey_all[order]).reshape(len(ids), DRAWERS, 28, 28, 1)
        # TFDS's record order is not the drawer order (file names are not features): sort each
        # class's drawings by their bytes, a canonical order the same in every zip.
        for c in range(len(ids)):
            ink[c] = ink[c][sorted(range(DRAWERS), key=lambda i: ink[c, i].tobytes())]
        classes = ClassImages(
            images=ink,
            alphabets=alpha_all[first],
            characters=np.asarray(
                [
                    f"{a}/character{c + 1:02d}"
                    for a, c in zip(alpha_all[first], char_all[first], strict=True)
                ]
            ),
            class_ids=ids.astype(np.int64),
            counts=counts.astype(np.int64),
        )
        classes.save(_cache_path(root, part))
    progress.finish(
        f"{len(ids)} characters x {DRAWERS} drawings cached in {_cache_path(root, part)}"
    )
    return classes


def load_omniglot_parts(
    parts: tuple[str, ...] = PARTS,
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
) -> dict[str, ClassImages]:
    """Loads Omniglot's source zips, one `ClassImages` per zip, sorted by character id.

    Each part is prepared once with TFDS (needs TensorFlow) and cached as
    `<data_dir>/cache/omniglot_<part>_v2.npz`; later loads read only the cache.

    Args:
      parts: names among `"background"` (964 characters), `"evaluation"` (659), `"small1"`
        (136) and `"small2"` (156).
      manual_dir: folder with the zips (or the folder holding `omniglot/`); default
        `$METANET_DATASETS/omniglot`; with neither, TFDS downloads the original zips.
      data_dir: writable folder, default `$METANET_DATA_DIR` or `~/.cache/metanet_jax/data`.

    Returns:
      `{part: ClassImages}` with images `[characters, 20, 28, 28, 1]` uint8, ink = 255.

    Raises:
      FileNotFoundError: a configured local folder or one of the needed zips is missing
        (checked for all parts before any work; nothing is written).
      DataUnavailable: (a `FileNotFoundError`) no local folder and no network: TFDS's
        download host does not answer (`_common.require_download`; nothing is written).
      ValueError: unknown part, or a zip whose sha256 is neither the original's nor the
        rebuilt one's.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"Unknown Omniglot part(s) {unknown}; expected some of {PARTS}.")
    root = _data_dir(data_dir)
    out = {
        p: ClassImages.load(_cache_path(root, p)) for p in parts if _cache_path(root, p).is_file()
    }
    todo = [p for p in parts if p not in out]
    if not todo:
        return out
    folder = local_folder(manual_dir, "omniglot")
    names = [ZIP_NAMES[p] for p in todo]
    if folder is not None:
        require_files(folder, names, "Omniglot", _HOW)
    else:
        require_download("Omniglot", DOWNLOAD_URL + names[0], "omniglot", names, _GET)
    builders = {p: _builder_name(folder, p) for p in todo}  # all checked before any work
    with preparation_lock(root):
        for p in todo:
            cached = _cache_path(root, p)
            if cached.is_file():  # prepared by another process while this one waited
                out[p] = ClassImages.load(cached)
            else:
                out[p] = _prepare_part(p, folder, builders[p], root)
    return {p: out[p] for p in parts}


def _empty_like(c: ClassImages) -> ClassImages:
    return c.select(np.zeros(0, np.int64))


def _concat(*cs: ClassImages) -> ClassImages:
    return ClassImages(*(np.concatenate(f) for f in zip(*cs, strict=True)))


def _carve(pool: ClassImages, n: int, rng: np.random.Generator) -> tuple[ClassImages, ClassImages]:
    """`(rest, carved)`: `n` classes of `pool` drawn by `rng.permutation`, both in id order."""
    if not 0 <= n < pool.num_classes:
        raise ValueError(
            f"validation_classes={n} must be in [0, {pool.num_classes}) for this scheme."
        )
    perm = rng.permutation(pool.num_classes)
    return pool.select(np.sort(perm[n:])), pool.select(np.sort(perm[:n]))


def _carve_alphabets(
    pool: ClassImages, n: int, rng: np.random.Generator
) -> tuple[ClassImages, ClassImages]:
    """`(rest, carved)`: every character of `n` whole alphabets of `pool`, the alphabets drawn
    by `rng.permutation` over the sorted alphabet names; both in id order."""
    names = np.unique(pool.alphabets)
    if not 0 < n < len(names):
        raise ValueError(f"validation_alphabets={n} must be in [1, {len(names)}) for this scheme.")
    chosen = names[rng.permutation(len(names))[:n]]
    held = np.isin(pool.alphabets, chosen)
    return pool.select(np.flatnonzero(~held)), pool.select(np.flatnonzero(held))


def load_omniglot(
    split_scheme: str = "standard",
    *,
    manual_dir: str | os.PathLike | None = None,
    data_dir: str | os.PathLike | None = None,
    validation_classes: int = DEFAULT_VALIDATION_CLASSES,
    validation_alphabets: int = 0,
    seed: int = DEFAULT_SPLIT_SEED,
) -> dict[str, ClassImages]:
    """Omniglot's characters split into train, validation and test classes.

    Schemes (all character lists in ascending global character id; `rng` is
    `numpy.random.default_rng(seed)`; `V = validation_classes`):

    * `"standard"` (Lake et al.): the 964 background characters, `perm = rng.permutation(964)`,
      validation = `perm[:V]`, train = the other `964 - V`; test = the 659 evaluation characters.
    * `"previous"` (Vinyals et al.): all 1623 characters (background then evaluation, i.e. by id),
      `perm = rng.permutation(1623)`; test = `perm[1200:]` (423), validation = `perm[:V]`,
      train = `perm[V:1200]`.
    * `"small1"`, `"small2"`, `"small"` (Lake's background subsets; `small` is their union, 292
      unique characters since Greek and Latin are in both): train = the subset, unchanged;
      validation = `V` characters of the *other* background characters (`rng.permutation` over
      them, ascending id); test = the 659 evaluation characters.

    With `validation_alphabets = A > 0` (standard and small schemes), validation is instead
    every character of `A` whole background alphabets (`rng.permutation` over the sorted
    alphabet names, among those not in the training subset for the small schemes), as the
    test set is whole alphabets never seen in training; `validation_classes` is then unused.
    Validation characters carved from the training alphabets read higher than test
    (characters of a known alphabet are easier); held-out alphabets predict test better.

    Args:
      split_scheme: one of `SPLIT_SCHEMES`.
      manual_dir: local zips (see `load_omniglot_parts`).
      data_dir: writable cache folder (see `load_omniglot_parts`).
      validation_classes: `V`, characters carved for validation (0 allowed).
      validation_alphabets: `A`, whole background alphabets held out for validation instead
        (0: carve `V` characters).
      seed: the split's seed (recorded default `DEFAULT_SPLIT_SEED = 0`).

    Returns:
      `{"train", "validation", "test"}: ClassImages`, images `[classes, 20, 28, 28, 1]` uint8.
      No character is in two splits.
    """
    v, a = _check_split_args(split_scheme, validation_classes, validation_alphabets)
    parts = load_omniglot_parts(
        _parts_for(split_scheme, max(v, a)), manual_dir=manual_dir, data_dir=data_dir
    )
    rng = np.random.default_rng(seed)
    carve = (lambda pool: _carve_alphabets(pool, a, rng)) if a else (lambda p: _carve(p, v, rng))
    if split_scheme == "previous":
        train, val, test = _previous_split(parts, v, rng)
    elif split_scheme == "standard":
        (train, val), test = carve(parts["background"]), parts["evaluation"]
    else:
        train, val = _small_split(parts, split_scheme, carve if v or a else None)
        test = parts["evaluation"]
    return {"train": train, "validation": val, "test": test}


def _check_split_args(scheme: str, validation_classes: int, validation_alphabets: int):
    """`(V, A)` as ints, after checking them and the scheme (`load_omniglot`)."""
    if scheme not in SPLIT_SCHEMES:
        raise ValueError(f"Unknown split scheme {scheme!r}; expected one of {SPLIT_SCHEMES}.")
    v = int(validation_classes)
    if v < 0:
        raise ValueError(f"validation_classes must be >= 0, got {v}.")
    a = int(validation_alphabets)
    if a < 0:
        raise ValueError(f"validation_alphabets must be >= 0, got {a}.")
    if a and scheme == "previous":
        raise ValueError(
            "validation_alphabets needs a scheme whose test set is whole alphabets (standard, "
            "small1, small2, small); the previous split mixes alphabets: use validation_classes"
        )
    return v, a


def _previous_split(parts: dict[str, ClassImages], v: int, rng: np.random.Generator):
    """`(train, validation, test)` of the previous split (Vinyals et al.; `load_omniglot`)."""
    every = _concat(parts["background"], parts["evaluation"])
    every = every.select(np.argsort(every.class_ids, kind="stable"))
    perm = rng.permutation(every.num_classes)
    if not 0 <= v < PREVIOUS_TRAIN_CLASSES:
        raise ValueError(f"validation_classes={v} must be in [0, {PREVIOUS_TRAIN_CLASSES}).")
    test = every.select(np.sort(perm[PREVIOUS_TRAIN_CLASSES:]))
    val = every.select(np.sort(perm[:v]))
    train = every.select(np.sort(perm[v:PREVIOUS_TRAIN_CLASSES]))
    return train, val, test


def _small_split(parts: dict[str, ClassImages], scheme: str, carve):
    """`(train, validation)` of a small scheme: the subset(s), and what `carve` (or `None`:
    nothing) holds out of the other background characters (`load_omniglot`)."""
    smalls = [parts[p] for p in (("small1", "small2") if scheme == "small" else (scheme,))]
    train = _concat(*smalls)
    _, unique = np.unique(train.class_ids, return_index=True)  # first copy, id order
    train = train.select(unique)
    if carve is None:
        return train, _empty_like(train)
    bg = parts["background"]
    return train, carve(bg.select(~np.isin(bg.class_ids, train.class_ids)))[1]
