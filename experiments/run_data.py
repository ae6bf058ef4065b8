"""A training run's data: its class arrays (`load_splits`), its model on them
(`model_config`), and its MNIST out-of-domain test."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

import jax
import numpy as np
from absl import logging

from experiments.schema import DATASETS, RunSpec
from metanet_jax import evaluation, parallel
from metanet_jax.config import MetaNetConfig
from metanet_jax.synthetic import synthetic_classes


def load_splits(spec: RunSpec) -> dict[str, np.ndarray]:
    """The train/validation/test class arrays of `spec.data.dataset` (reads only; fails fast):
    `{"train", "validation", "test"}` -> `[C, D, H, W, ch]` uint8 arrays (numpy).

    Raises:
      FileNotFoundError: a configured data folder or file is missing.
    """
    from metanet_jax import data

    want = spec.data
    if want.dataset == "omniglot":
        parts = data.load_omniglot(
            want.split,
            manual_dir=want.datasets,
            validation_classes=want.validation_classes,
            validation_alphabets=want.validation_alphabets,
            seed=want.split_seed,
        )
        return {k: v.images for k, v in parts.items()}
    if want.dataset == "mini_imagenet":
        folder = want.mini_imagenet_dir
        if not folder or not Path(folder).is_dir():
            raise FileNotFoundError(
                f"--mini_imagenet_dir={folder!r}: no such folder. Mini-ImageNet is not "
                "distributed with this project; see docs/DATA.md for the expected layout "
                "(Ravi & Larochelle's train/val/test CSVs and the images folder)."
            )
        names = {"train": "train", "validation": "val", "test": "test"}
        return {k: data.load_mini_imagenet(folder, v).images for k, v in names.items()}
    if want.dataset == "synthetic":
        s = want.synthetic_size
        return {
            "train": synthetic_classes(10, 40, 20, s),
            "validation": synthetic_classes(11, 20, 20, s),
            "test": synthetic_classes(12, 20, 20, s),
        }
    raise ValueError(f"unknown dataset {want.dataset!r}; expected one of {DATASETS}")


def image_shape(spec: RunSpec) -> tuple[int, ...]:
    """The `[H, W, ch]` of the images `load_splits(spec)` returns, known before loading
    them: Omniglot 28x28x1, Mini-ImageNet 84x84x3, synthetic `synthetic_size` squared x1."""
    dataset = spec.data.dataset
    if dataset == "omniglot":
        return (28, 28, 1)
    if dataset == "mini_imagenet":
        return (84, 84, 3)
    if dataset == "synthetic":
        return (spec.data.synthetic_size, spec.data.synthetic_size, 1)
    raise ValueError(f"unknown dataset {dataset!r}; expected one of {DATASETS}")


def model_config(spec: RunSpec, image_shape: tuple[int, ...]) -> MetaNetConfig:
    """The `MetaNetConfig` of a run: its model with the data's image shape."""
    return dataclasses.replace(spec.model, image_shape=tuple(int(s) for s in image_shape))


def load_data(spec: RunSpec) -> dict[str, np.ndarray]:
    """The run's class arrays; fails before any write. Process 0 prepares the data caches
    before the others read them."""
    splits = load_splits(spec) if parallel.is_primary() else None
    parallel.barrier("experiments.train:data")
    return load_splits(spec) if splits is None else splits


def mnist_out_of_domain(spec: RunSpec, config: MetaNetConfig, params, stop) -> dict[str, Any]:
    """The MNIST out-of-domain test of a run (`spec.mnist_protocol()`), stopped by a signal
    (`runtime.Interrupted`) between batches; its results.json entries."""
    from metanet_jax import data

    images = jax.device_put(data.load_mnist(manual_dir=spec.data.datasets)["test"].images)
    result = evaluation.measure(params, config, images, spec.mnist_protocol(), stop=stop)
    logging.info("MNIST 10-way 1-shot (out of domain) %s", result.line())
    return {"mnist_accuracy": result.mean, "mnist_ci95": result.ci95,
            "mnist_episodes": result.episodes}  # fmt: skip


def environment_summary() -> str:
    """One line: devices, the data folders in use and glibc's malloc tunables."""
    return (
        f"devices: {jax.device_count()} x {jax.devices()[0].platform}; "
        f"METANET_DATASETS={os.environ.get('METANET_DATASETS', '<unset>')}; "
        f"METANET_DATA_DIR={os.environ.get('METANET_DATA_DIR', '<default>')}; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '<unset>')}"
    )
