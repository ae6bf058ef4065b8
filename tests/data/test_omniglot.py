"""Omniglot loading, preprocessing, caching and the class-split schemes."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import zipfile

import numpy as np
import pytest

from metanet_jax import data


def test_counts(omniglot_parts):
    expected = {"background": 964, "evaluation": 659, "small1": 136, "small2": 156}
    for part, n in expected.items():
        c = omniglot_parts[part]
        assert c.images.shape == (n, 20, 28, 28, 1), part
        assert c.images.dtype == np.uint8
        assert len(c.alphabets) == len(c.characters) == len(c.class_ids) == n
        assert np.all(c.counts == 20)
        assert len(set(c.characters)) == n
    bg, ev = omniglot_parts["background"], omniglot_parts["evaluation"]
    assert len(set(bg.alphabets)) == 30 and len(set(ev.alphabets)) == 20
    np.testing.assert_array_equal(np.concatenate([bg.class_ids, ev.class_ids]), np.arange(1623))


def test_small_subsets_are_background_characters(omniglot_parts):
    bg = omniglot_parts["background"]
    for part in ("small1", "small2"):
        small = omniglot_parts[part]
        assert len(set(small.alphabets)) == 5
        idx = np.searchsorted(bg.class_ids, small.class_ids)
        np.testing.assert_array_equal(bg.class_ids[idx], small.class_ids)
        # Same PNGs in both zips, canonical drawer order: identical arrays.
        np.testing.assert_array_equal(bg.images[idx], small.images)
        np.testing.assert_array_equal(bg.characters[idx], small.characters)


def test_ink_is_one_and_strokes_survive(omniglot_parts, datasets_root):
    bg = omniglot_parts["background"]
    imgs = bg.images.reshape(-1, 28 * 28).astype(np.float32) / 255
    # Ink is bright on a dark background; every drawing keeps a solid stroke.
    assert np.median(imgs) == 0.0
    assert imgs.max(axis=1).min() > 0.5
    assert 0.03 < imgs.mean() < 0.2
    # End to end: one PNG from the zip, inverted then area-resized, is one of its class's images
    # and keeps the ink mass of the 105x105 original.
    from PIL import Image

    with zipfile.ZipFile(datasets_root / "omniglot" / "images_background.zip") as z:
        name = next(n for n in z.namelist() if n.endswith(".png"))
        grey = np.asarray(Image.open(io.BytesIO(z.read(name))).convert("L"), np.uint8)
    char_id = int(name.rsplit("/", 1)[1].split("_")[0]) - 1
    ours = data.strokes_to_ink(grey[None])[0]
    cls = bg.images[np.searchsorted(bg.class_ids, char_id)]
    assert any(np.array_equal(ours, img) for img in cls)
    ink_105 = (255.0 - grey).mean() / 255
    assert ours.mean() / 255 == pytest.approx(ink_105, abs=2e-3)


def test_area_resize_keeps_a_one_pixel_stroke():
    grey = np.full((1, 105, 105), 255, np.uint8)
    grey[0, 10:95, 52] = 0  # a vertical 1-pixel stroke
    ink = data.strokes_to_ink(grey)[0, ..., 0].astype(np.float32) / 255
    assert ink.sum() * (105 / 28) ** 2 == pytest.approx(85, rel=0.02)  # ink mass kept
    # Continuous: every output row it crosses has ink (a 1-pixel stroke covers at most 1/3.75
    # of an output pixel's width; this one straddles two output columns: 2 x 0.133).
    assert (ink[3:25].max(axis=1) > 0.1).all()
    assert ink[3:25].sum(axis=1) == pytest.approx(1 / 3.75, rel=1e-3)


@pytest.mark.parametrize("scheme", data.SPLIT_SCHEMES)
def test_splits_disjoint_and_sized(scheme, omniglot_parts, datasets_root, cache_dir):
    splits = data.load_omniglot(scheme, manual_dir=datasets_root, data_dir=cache_dir)
    assert set(splits) == {"train", "validation", "test"}
    ids = {k: set(v.class_ids.tolist()) for k, v in splits.items()}
    assert not ids["train"] & ids["validation"]
    assert not ids["train"] & ids["test"]
    assert not ids["validation"] & ids["test"]
    sizes = {k: v.images.shape[0] for k, v in splits.items()}
    expected = {
        "standard": (864, 100, 659),
        "previous": (1100, 100, 423),
        "small1": (136, 100, 659),
        "small2": (156, 100, 659),
        "small": (242, 100, 659),  # Greek and Latin (50 characters) are in both subsets
    }[scheme]
    assert (sizes["train"], sizes["validation"], sizes["test"]) == expected
    for v in splits.values():
        assert v.images.shape[1:] == (20, 28, 28, 1)
        assert np.all(np.diff(v.class_ids) > 0)  # ascending ids, no duplicates
    if scheme != "previous":
        assert ids["test"] == set(range(964, 1623))
        assert ids["train"] | ids["validation"] <= set(range(964))
    else:
        assert len(ids["train"] | ids["validation"] | ids["test"]) == 1623


def test_split_seed(datasets_root, cache_dir):
    kw = dict(manual_dir=datasets_root, data_dir=cache_dir)
    a = data.load_omniglot("standard", seed=0, **kw)
    b = data.load_omniglot("standard", seed=0, **kw)
    c = data.load_omniglot("standard", seed=1, **kw)
    np.testing.assert_array_equal(a["validation"].class_ids, b["validation"].class_ids)
    assert not np.array_equal(a["validation"].class_ids, c["validation"].class_ids)
    d = data.load_omniglot("standard", validation_classes=0, **kw)
    assert d["train"].images.shape[0] == 964 and d["validation"].images.shape[0] == 0


def test_bad_scheme_and_sizes(datasets_root, cache_dir):
    with pytest.raises(ValueError, match="Unknown split scheme"):
        data.load_omniglot("lake", manual_dir=datasets_root, data_dir=cache_dir)
    with pytest.raises(ValueError, match="validation_classes"):
        data.load_omniglot(
            "standard", validation_classes=964, manual_dir=datasets_root, data_dir=cache_dir
        )
    with pytest.raises(ValueError, match="validation_classes"):
        data.load_omniglot("previous", validation_classes=-1, data_dir=cache_dir)


def test_cached_load_in_fresh_process_is_fast(omniglot_parts, datasets_root, cache_dir):
    code = (
        "import json, sys, time\n"
        "from metanet_jax import data\n"
        "t = time.perf_counter()\n"
        f"s = data.load_omniglot('standard', data_dir={str(cache_dir)!r})\n"
        "dt = time.perf_counter() - t\n"
        "print(json.dumps({'seconds': dt, 'tf': 'tensorflow' in sys.modules,\n"
        "                  'tfds': 'tensorflow_datasets' in sys.modules,\n"
        "                  'train': s['train'].images.shape[0]}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["train"] == 864
    assert not result["tf"] and not result["tfds"]
    assert result["seconds"] < 1.0, result


def test_import_does_not_import_tensorflow():
    code = (
        "import sys, metanet_jax, metanet_jax.data\n"
        "print(any(m.split('.')[0] in ('tensorflow', 'tensorflow_datasets') for m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("scheme", ["standard", "small1"])
def test_validation_alphabets_are_whole_held_out_alphabets(scheme, datasets_root, cache_dir):
    kw = dict(manual_dir=datasets_root, data_dir=cache_dir)
    split = data.load_omniglot(scheme, validation_alphabets=3, **kw)
    bg = data.load_omniglot_parts(("background",), **kw)["background"]
    val_alphabets = set(split["validation"].alphabets)
    assert len(val_alphabets) == 3
    # Every background character of those alphabets, and no other character, is validation.
    expected = {c for c, a in zip(bg.class_ids, bg.alphabets, strict=True) if a in val_alphabets}
    assert set(split["validation"].class_ids) == expected
    assert not val_alphabets & set(split["train"].alphabets)
    assert not val_alphabets & set(split["test"].alphabets)
    if scheme == "standard":  # the other 27 background alphabets are all training
        assert split["train"].num_classes + len(expected) == 964
    again = data.load_omniglot(scheme, validation_alphabets=3, **kw)
    np.testing.assert_array_equal(again["validation"].class_ids, split["validation"].class_ids)
    with pytest.raises(ValueError, match="previous split mixes alphabets"):
        data.load_omniglot("previous", validation_alphabets=3, **kw)
    with pytest.raises(ValueError, match="validation_alphabets=30"):
        data.load_omniglot("standard", validation_alphabets=30, **kw)
