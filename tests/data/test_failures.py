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


@pytest.fixture
def no_local_data(tmp_path, monkeypatch):
    """No `$METANET_DATASETS` and an empty data folder (returned): a load must download."""
    monkeypatch.delenv("METANET_DATASETS", raising=False)

    def no_tfds(*args, **kwargs):
        raise AssertionError("TFDS's preparation started")

    monkeypatch.setattr(data.omniglot, "prepared_builder", no_tfds)
    monkeypatch.setattr(data.mnist, "prepared_builder", no_tfds)
    return tmp_path / "out"


def test_no_local_data_and_an_unreachable_host_is_one_clear_error(no_local_data, monkeypatch):
    """Without a local folder and without a network (here: a host name that cannot resolve,
    RFC 2606's `.invalid`), the load stops before TFDS with one error naming
    METANET_DATASETS / --datasets and the files expected, its traceback free of TFDS's."""
    monkeypatch.setattr(data.omniglot, "DOWNLOAD_URL", "https://metanet-jax.invalid/omniglot/")
    monkeypatch.setattr(data.mnist, "DOWNLOAD_URL", "https://metanet-jax.invalid/mnist/")
    t = time.perf_counter()
    with pytest.raises(data.DataUnavailable) as e:
        data.load_omniglot("standard", data_dir=no_local_data)
    message = str(e.value)
    for needed in ("$METANET_DATASETS", "--datasets", "omniglot/", "images_background.zip",
                   "images_evaluation.zip", "metanet-jax.invalid"):  # fmt: skip
        assert needed in message, (needed, message)
    assert e.value.__cause__ is None and e.value.__suppress_context__
    assert isinstance(e.value, FileNotFoundError)  # the programs' one-line errors
    with pytest.raises(data.DataUnavailable, match=r"mnist/ with train-images-idx3-ubyte.gz"):
        data.load_mnist(data_dir=no_local_data)
    assert time.perf_counter() - t < 30
    assert _empty(no_local_data)


def test_no_local_data_with_a_network_goes_to_tfds_download(no_local_data, monkeypatch):
    """A host that answers (any HTTP status) means a network: TFDS's normal download
    (no manual folder) goes ahead, for only the parts the split needs."""
    import requests

    asked = []

    class Answer:
        def close(self):
            pass

    monkeypatch.setattr(requests, "head", lambda url, **kw: asked.append(url) or Answer())
    prepared = []

    def prepare(part, folder, builder_name, root):
        prepared.append((part, folder, builder_name))
        raise RuntimeError("stop here")

    monkeypatch.setattr(data.omniglot, "_prepare_part", prepare)
    with pytest.raises(RuntimeError, match="stop here"):
        data.load_omniglot_parts(("small1",), data_dir=no_local_data)
    assert asked == [data.omniglot.DOWNLOAD_URL + "images_background_small1.zip"]
    assert prepared == [("small1", None, "metanet_omniglot")]


def test_the_probed_urls_are_those_tfds_downloads():
    from tensorflow_datasets.image_classification import mnist as tfds_mnist
    from tensorflow_datasets.image_classification import omniglot as tfds_omniglot

    from metanet_jax.data import _tfds_builders

    for part, name in data.omniglot.ZIP_NAMES.items():
        assert data.omniglot.DOWNLOAD_URL + name == _tfds_builders.url(part)
    assert set(tfds_omniglot._DL_URLS.values()) == {
        data.omniglot.DOWNLOAD_URL + n for n in data.omniglot.ZIP_NAMES.values()
    }
    assert data.mnist.DOWNLOAD_URL == tfds_mnist._MNIST_URL
