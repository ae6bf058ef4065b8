"""Fixtures of the data tests: the offline data sets, prepared once per test run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _datasets_root() -> Path | None:
    candidates = [os.environ.get("METANET_DATASETS"), REPO.parent / "shared" / "datasets"]
    for c in candidates:
        if c and (Path(c) / "omniglot").is_dir() and (Path(c) / "mnist").is_dir():
            return Path(c)
    return None


@pytest.fixture(scope="session")
def datasets_root() -> Path:
    root = _datasets_root()
    if root is None:
        pytest.skip(
            "offline data sets not found: set METANET_DATASETS to a folder holding omniglot/ "
            "and mnist/ (../shared/datasets in this project's CI, which never skips them)"
        )
    return root


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """`$METANET_DATA_DIR` when set (reused between runs), else a fresh folder of this run.

    Under pytest-xdist the workers share one folder (the run's base temp, above each worker's
    own), so a data set is prepared once per run, not once per worker that needs it: the
    library's preparation lock makes a second worker wait for the first one's cache.
    """
    env = os.environ.get("METANET_DATA_DIR")
    if env:
        return Path(env)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = tmp_path_factory.getbasetemp().parent / "metanet_data"
        shared.mkdir(exist_ok=True)
        return shared
    return tmp_path_factory.mktemp("metanet_data")


@pytest.fixture(scope="session")
def omniglot_parts(datasets_root, cache_dir):
    from metanet_jax import data

    return data.load_omniglot_parts(manual_dir=datasets_root, data_dir=cache_dir)


@pytest.fixture(scope="session")
def mnist(datasets_root, cache_dir):
    from metanet_jax import data

    return data.load_mnist(manual_dir=datasets_root, data_dir=cache_dir)
