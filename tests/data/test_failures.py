"""Missing, wrong or corrupt inputs fail fast with a clear error and leave nothing behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from metanet_jax import data
from metanet_jax.data._common import cleanup_on_error, preparation_lock


def _empty(path):
    return not path.exists() or not any(path.rglob("*"))


def test_empty_folder(tmp_path):
    (tmp_path / "archives" / "omniglot").mkdir(parents=True)
    (tmp_path / "archives" / "mnist").mkdir()
    out = tmp_path / "out"
    t = time.perf_counter()
    with pytest.raises(FileNotFoundError, match="images_background.zip") as e:
        data.load_omniglot("standard", manual_dir=tmp_path / "archives", data_dir=out)
    assert str(tmp_path / "archives" / "omniglot") in str(e.value)
    assert "images_evaluation.zip" in str(e.value)
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte.gz"):
        data.load_mnist(manual_dir=tmp_path / "archives", data_dir=out)
    assert time.perf_counter() - t < 10
    assert _empty(out)


def test_missing_folder_and_env(tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("METANET_DATASETS", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_omniglot("small1", data_dir=out)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        data.load_mnist(data_dir=out)
    assert _empty(out)


def test_wrong_folder(tmp_path):
    """A folder with other files (here: MNIST's) is not taken for Omniglot."""
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "train-images-idx3-ubyte.gz").write_bytes(b"x")
    with pytest.raises(FileNotFoundError, match="images_background_small1.zip"):
        data.load_omniglot_parts(("small1",), manual_dir=wrong, data_dir=tmp_path / "out")
    assert _empty(tmp_path / "out")


def test_corrupt_file_then_good_file(tmp_path, datasets_root, omniglot_parts):
    """A corrupt zip fails before any work; the right zip later prepares the split."""
    archives, out = tmp_path / "archives", tmp_path / "out"
    archives.mkdir()
    name = "images_background_small1.zip"
    (archives / name).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="sha256"):
        data.load_omniglot_parts(("small1",), manual_dir=archives, data_dir=out)
    assert _empty(out)
    # Only this one zip is present: only its split is built. The preparation runs as a program
    # would (absl logging at INFO, TensorFlow's and JAX's log settings unset, output to a file):
    # its log holds a few lines of its own, not TFDS's progress bars or TensorFlow's notices.
    (archives / name).unlink()
    os.symlink(datasets_root / "omniglot" / name, archives / name)
    code = (
        "import sys; from absl import logging; logging.set_verbosity(logging.INFO)\n"
        "from metanet_jax import data\n"
        "data.load_omniglot_parts(('small1',), manual_dir=sys.argv[1], data_dir=sys.argv[2])\n"
    )
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TF_", "JAX_PLATFORMS"))}
    env.update(PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", code, str(archives), str(out)],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = (proc.stdout + proc.stderr).splitlines()
    assert len(lines) <= 12, "\n".join(lines[:40])
    assert any("Omniglot 'small1'" in line and "cached in" in line for line in lines), lines
    assert not any("oneDNN" in line or "Dl Completed" in line for line in lines), lines
    small1 = data.ClassImages.load(
        out / "cache" / f"omniglot_small1_v{data._common.CACHE_VERSION}.npz"
    )
    assert (small1.images == omniglot_parts["small1"].images).all()
    assert not (out / "downloads" / "mnist").exists()


def test_bad_part_name(tmp_path):
    with pytest.raises(ValueError, match="Unknown Omniglot part"):
        data.load_omniglot_parts(("train",), data_dir=tmp_path / "out")
    assert _empty(tmp_path / "out")


def test_cleanup_on_error_removes_only_new_entries(tmp_path):
    root = tmp_path / "root"
    sub = root / "sub"
    sub.mkdir(parents=True)
    (sub / "old").write_text("keep")
    with pytest.raises(RuntimeError), cleanup_on_error(root, sub, root / "new"):
        (sub / "half").mkdir()
        (sub / "half" / "x").write_text("partial")
        (root / "new").mkdir()
        raise RuntimeError("boom")
    assert sorted(p.name for p in sub.iterdir()) == ["old"]
    assert not (root / "new").exists()
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError), cleanup_on_error(fresh, fresh / "a"):
        (fresh / "a").mkdir(parents=True)
        raise RuntimeError("boom")
    assert not fresh.exists()


def test_preparation_lock_makes_a_second_process_wait(tmp_path):
    root = tmp_path / "data"
    code = (
        "import sys, time; from pathlib import Path; "
        "from metanet_jax.data._common import preparation_lock\n"
        "with preparation_lock(Path(sys.argv[1])):\n"
        "    print('acquired', time.time(), flush=True)"
    )
    repo = Path(__file__).resolve().parents[2]
    env = dict(os.environ, PYTHONPATH=str(repo), JAX_PLATFORMS="cpu")
    with preparation_lock(root):
        child = subprocess.Popen(
            [sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True, env=env
        )
        time.sleep(3.0)  # the child starts and blocks on the lock meanwhile
        assert child.poll() is None, child.communicate()
        released = time.time()
    out, _ = child.communicate(timeout=60)
    assert child.returncode == 0
    assert float(out.split()[1]) >= released
    assert not root.exists()  # the lock file sits beside the data folder, not in it
    assert (tmp_path / ".data.lock").is_file()
