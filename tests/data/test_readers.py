"""Lake's one-shot runs and mini-ImageNet readers, on small folders built here."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from PIL import Image

from metanet_jax import data


def _stroke_png(path, seed):
    rng = np.random.default_rng(seed)
    img = np.full((105, 105), 255, np.uint8)
    r, c = rng.integers(10, 80, 2)
    img[r : r + 20, c : c + 3] = 0  # a dark stroke on white, as in Omniglot
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).convert("1").save(path)


def _lake_folder(root, runs=2, ways=3):
    for r in range(1, runs + 1):
        run = root / f"run{r:02d}"
        lines = []
        for k in range(1, ways + 1):
            _stroke_png(run / "training" / f"class{k:02d}.png", seed=100 * r + k)
        # item m shows class (m % ways) + 1: the same drawing as its training example
        for m in range(1, ways + 1):
            k = (m % ways) + 1
            _stroke_png(run / "test" / f"item{m:02d}.png", seed=100 * r + k)
            lines.append(f"run{r:02d}/test/item{m:02d}.png run{r:02d}/training/class{k:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def test_lake_runs(tmp_path):
    _lake_folder(tmp_path)
    runs = data.load_lake_runs(tmp_path)
    assert len(runs) == 2
    for support, query in runs:
        assert support.x.shape == (3, 28, 28, 1) and query.x.shape == (3, 28, 28, 1)
        assert support.x.dtype == np.float32
        np.testing.assert_array_equal(support.y, [0, 1, 2])
        np.testing.assert_array_equal(query.y, [1, 2, 0])  # item m -> class (m % 3) + 1
        for x, y in zip(query.x, query.y, strict=True):
            np.testing.assert_array_equal(x, support.x[y])
        assert np.median(support.x) == 0.0 and support.x.max() > 0.5  # ink = 1
    stacked = jax.tree.map(lambda *a: np.stack(a), *runs)
    assert stacked[0].x.shape == (2, 3, 28, 28, 1)


def test_lake_runs_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="runNN"):
        data.load_lake_runs(tmp_path / "missing")
    _lake_folder(tmp_path)
    (tmp_path / "run01" / "test" / "item02.png").unlink()
    with pytest.raises(FileNotFoundError, match="item02"):
        data.load_lake_runs(tmp_path)


def _mini_folder(root, classes=3, per_class=(4, 5, 4)):
    rows = ["filename,label"]
    for c in range(classes):
        for i in range(per_class[c]):
            name = f"n{c:08d}{i:08d}.jpg"
            color = np.full((90, 120, 3), (40 * c, 10 * i, 200), np.uint8)
            (root / "images").mkdir(parents=True, exist_ok=True)
            Image.fromarray(color).save(root / "images" / name, format="PNG")
            rows.append(f"{name},n{c:08d}")
    for split in ("train", "val", "test"):
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def test_mini_imagenet(tmp_path):
    folder, out = tmp_path / "mini", tmp_path / "out"
    _mini_folder(folder)
    train = data.load_mini_imagenet(folder, "train", data_dir=out)
    assert train.images.shape == (3, 4, 84, 84, 3) and train.images.dtype == np.uint8
    np.testing.assert_array_equal(train.counts, [4, 5, 4])
    assert list(train.characters) == ["n00000000", "n00000001", "n00000002"]
    np.testing.assert_array_equal(train.images[1, 2, 0, 0], [40, 20, 200])
    assert len(list((out / "cache").glob("mini_imagenet_train_*.npz"))) == 1
    (folder / "images" / "n0000000000000000.jpg").unlink()  # cached: no image is read
    again = data.load_mini_imagenet(folder, "train", data_dir=out)
    np.testing.assert_array_equal(again.images, train.images)
    s, q = data.sample_episodes(
        jax.random.key(0), jax.device_put(train.images), 3, 1, 2, 2, rotate=False
    )
    assert s.x.shape == (2, 3, 84, 84, 3) and q.x.shape == (2, 6, 84, 84, 3)


def test_mini_imagenet_errors(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(FileNotFoundError, match="train.csv"):
        data.load_mini_imagenet(tmp_path / "missing", "train", data_dir=out)
    folder = tmp_path / "mini"
    _mini_folder(folder)
    (folder / "images" / "n0000000100000003.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="n0000000100000003.jpg"):
        data.load_mini_imagenet(folder, "val", data_dir=out)
    with pytest.raises(ValueError, match="split"):
        data.load_mini_imagenet(folder, "dev", data_dir=out)
    assert not out.exists()


def test_mini_imagenet_split_info_checksums_and_counts(tmp_path, monkeypatch, caplog):
    import hashlib
    import logging

    from metanet_jax.data import mini_imagenet

    folder = tmp_path / "mini"
    _mini_folder(folder)
    info = mini_imagenet.split_info(folder, "validation")
    want = hashlib.sha256((folder / "val.csv").read_bytes()).hexdigest()
    assert info["file"] == "val.csv" and info["sha256"] == want
    assert (info["classes"], info["images"], info["min_per_class"], info["max_per_class"]) == (
        3, 13, 4, 5,
    )  # fmt: skip
    assert info["published_sha256"] is None and info["standard"] is False
    with caplog.at_level(logging.INFO, logger=mini_imagenet.__name__):
        data.load_mini_imagenet(folder, "val", data_dir=tmp_path / "out")
    assert f"val.csv: sha256 {want}, 3 classes" in caplog.text
    assert "not Ravi & Larochelle's 16 classes of 600 images" in caplog.text

    # Ravi & Larochelle's shape: 64 training classes of 600 images (the CSV alone is read).
    rows = ["filename,label"] + [
        f"n{c:08d}{i:08d}.jpg,n{c:08d}" for c in range(64) for i in range(600)
    ]
    (folder / "train.csv").write_text("\n".join(rows) + "\n")
    info = mini_imagenet.split_info(folder, "train")
    assert (info["classes"], info["images"], info["standard"]) == (64, 38400, True)
    # A published checksum, once recorded, must match.
    monkeypatch.setitem(mini_imagenet.PUBLISHED_SHA256, "train", "0" * 64)
    assert mini_imagenet.split_info(folder, "train")["standard"] is False
    monkeypatch.setitem(mini_imagenet.PUBLISHED_SHA256, "train", info["sha256"])
    assert mini_imagenet.split_info(folder, "train")["standard"] is True
