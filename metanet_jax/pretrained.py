"""Pretrained models: a trained run's parameters in a small, pickle-free folder.

A pretrained folder (`pretrained/<name>/` in the repository, or any folder of this layout):

* `params.npz`: the parameters theta only (no optimiser state, no step, no key): one array
  per leaf of the params tree, named by its path joined with "/" (`base/conv_0/kernel`).
  `np.load(path, allow_pickle=False)` reads it; nothing in it executes code on loading.
* `config.json`: the training run's `config.json` (every flag of the run, so its split,
  validation classes, evaluation queries and batch are known; the model configuration; the
  library versions of the training run).
* `results.json`: `test_accuracy`, `test_ci95`, `test_episodes` measured by the program
  `experiments.export_pretrained` with the protocol `python -m experiments.evaluate` runs by
  default (`experiments.protocol.evaluate_run`) on the machine given by `test_platform`,
  the protocol itself (`test_protocol`), the run's flags (`config`: `ways`, `shots`,
  `split`, ...), the training run's `steps`, `wall_time_s`,
  `hardware` and `evaluated_step` (the checkpoint exported), and `training_run`: what the
  training run itself measured (its own test, possibly on another machine).

`load_pretrained(name_or_path)` reads one (offline: a name is a folder of the repository's
`pretrained/`); `load(path)` (`metanet_jax.load`) reads a pretrained folder or a run
folder's checkpoint.
The program `python -m experiments.export_pretrained` writes them (`experiments.exporting`),
measuring the test accuracy with the run's own protocol (`experiments.protocol`), so
`python -m experiments.evaluate --workdir=pretrained/<name>` prints the recorded accuracy
again.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from metanet_jax.config import MetaNetConfig
from metanet_jax.types import Params

PARAMS_FILE = "params.npz"
CONFIG_FILE = "config.json"
RESULTS_FILE = "results.json"
REPO_PRETRAINED = Path(__file__).resolve().parents[1] / "pretrained"
MAX_TOTAL_BYTES = 10_000_000  # all of the repository's pretrained/ together
MAX_MODEL_BYTES = 2_000_000  # one model folder
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_SEP = "/"


# ----------------------------------------------------------------------------- params file
def _leaves(tree) -> list[tuple[str, Any]]:
    """`(path, leaf)` of a nested-dict tree in sorted key order, paths joined with "/".

    Raises:
      ValueError: a key that is not a non-empty string without "/" (ambiguous path).
    """
    out = []

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for k in sorted(node):
                if not isinstance(k, str) or _SEP in k or not k:
                    raise ValueError(f"params key {k!r} under {prefix or '<root>'} cannot be saved")
                walk(node[k], f"{prefix}{_SEP}{k}" if prefix else k)
        else:
            out.append((prefix, node))

    walk(tree, "")
    return out


def flatten_params(params: Params) -> dict[str, np.ndarray]:
    """`{"base/conv_0/kernel": array, ...}`: every leaf of a nested-dict params tree (numpy).

    Raises:
      ValueError: a key that is not a non-empty string without "/".
    """
    return {k: np.asarray(jax.device_get(v)) for k, v in _leaves(params)}


def unflatten_params(flat: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of `flatten_params`."""
    tree: dict[str, Any] = {}
    for path, value in flat.items():
        node = tree
        *parents, leaf = path.split(_SEP)
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def save_params(path: str | os.PathLike, params: Params) -> Path:
    """Writes `params` as a compressed `.npz` of `flatten_params` (no pickle)."""
    path = Path(path)
    flat = flatten_params(params)
    for k, v in flat.items():
        if v.dtype == object:
            raise ValueError(f"params leaf {k} is not a numeric array")
    with open(path, "wb") as f:
        np.savez_compressed(f, **flat)
    return path


def load_params(path: str | os.PathLike) -> dict[str, Any]:
    """Reads a `save_params` file (`allow_pickle=False`) into a nested dict of numpy arrays."""
    with np.load(path, allow_pickle=False) as f:
        return unflatten_params({k: f[k] for k in f.files})


def check_params(params: Params, config: MetaNetConfig, where: str = "params") -> None:
    """Raises ValueError (one line) unless `params` has the tree, shapes and dtypes that
    `init(config)` gives."""
    from metanet_jax.model.episode import init

    want = jax.eval_shape(lambda: init(jax.random.key(0), config))
    want_flat = {k: (tuple(v.shape), np.dtype(v.dtype)) for k, v in _leaves(want)}
    have_flat = {k: (v.shape, v.dtype) for k, v in flatten_params(params).items()}
    missing = sorted(set(want_flat) - set(have_flat))
    extra = sorted(set(have_flat) - set(want_flat))
    wrong = sorted(k for k in set(want_flat) & set(have_flat) if want_flat[k] != have_flat[k])
    problems = []
    if missing:
        problems.append(f"missing {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected {', '.join(extra)}")
    if wrong:
        problems.append(
            "shape/dtype of "
            + ", ".join(f"{k} {have_flat[k]} (config: {want_flat[k]})" for k in wrong)
        )
    if problems:
        raise ValueError(f"{where} does not match its model configuration: {'; '.join(problems)}")


# ----------------------------------------------------------------------------- loading
def is_pretrained(folder: str | os.PathLike) -> bool:
    """Whether `folder` is a pretrained folder (`params.npz` and `config.json`)."""
    folder = Path(folder)
    return (folder / PARAMS_FILE).is_file() and (folder / CONFIG_FILE).is_file()


def available() -> list[str]:
    """Names of the pretrained models in the repository's `pretrained/`."""
    if not REPO_PRETRAINED.is_dir():
        return []
    return sorted(p.name for p in REPO_PRETRAINED.iterdir() if is_pretrained(p))


def resolve(name_or_path: str | os.PathLike) -> Path:
    """The folder of a pretrained model: an existing folder, else `pretrained/<name>` of the
    repository.

    Raises:
      FileNotFoundError: neither exists (the message lists the available names).
    """
    path = Path(name_or_path).expanduser()
    if is_pretrained(path):
        return path
    if NAME_PATTERN.match(str(name_or_path)) and is_pretrained(REPO_PRETRAINED / str(name_or_path)):
        return REPO_PRETRAINED / str(name_or_path)
    names = ", ".join(available()) or "none yet"
    raise FileNotFoundError(
        f"no pretrained model {str(name_or_path)!r}: not a folder holding {PARAMS_FILE} and "
        f"{CONFIG_FILE}, nor a name in {REPO_PRETRAINED} (available: {names})"
    )


def load_pretrained_with_meta(
    name_or_path: str | os.PathLike,
) -> tuple[MetaNetConfig, Params, dict[str, Any]]:
    """As `load_pretrained`, plus `meta`: `flags` (the run's flags), `step` (the checkpoint
    exported), `results` (results.json, `{}` when absent) and `folder`."""
    from metanet_jax.checkpointing import config_from_dict

    folder = resolve(name_or_path)
    saved = json.loads((folder / CONFIG_FILE).read_text())
    if "model_config" not in saved:
        raise ValueError(f"{folder / CONFIG_FILE} has no model_config")
    config = config_from_dict(saved["model_config"])
    params = load_params(folder / PARAMS_FILE)
    check_params(params, config, str(folder / PARAMS_FILE))
    results_path = folder / RESULTS_FILE
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    meta = {
        "flags": saved.get("flags", {}),
        "step": results.get("evaluated_step"),
        "results": results,
        "folder": str(folder),
    }
    return config, jax.tree.map(jnp.asarray, params), meta


def load_pretrained(name_or_path: str | os.PathLike) -> tuple[MetaNetConfig, Params]:
    """The configuration and parameters of a pretrained model (offline; no pickle).

    Args:
      name_or_path: a folder holding `params.npz` and `config.json`, or the name of one in
        the repository's `pretrained/` (e.g. `"demo"`).

    Returns:
      `(config, params)`, as `evaluation.load_checkpoint` returns them.

    Raises:
      FileNotFoundError: no such model. ValueError: params that do not fit the config.
    """
    config, params, _ = load_pretrained_with_meta(name_or_path)
    return config, params


def load(
    path: str | os.PathLike, which: str = "best"
) -> tuple[MetaNetConfig, Params, dict[str, Any]]:
    """`(config, params, meta)` of a model: a pretrained folder (or the name of one in the
    repository's `pretrained/`) or a training run's folder, whose `which` checkpoint ("best"
    or "latest") is read (`checkpointing.load_run`). Exported as `metanet_jax.load`.

    Raises:
      FileNotFoundError: neither a pretrained folder nor a run with checkpoints.
      ValueError / checkpointing.CheckpointError: files that do not hold a good model.
    """
    if is_pretrained(path) or not Path(path).expanduser().exists():
        return load_pretrained_with_meta(path)  # a name in pretrained/, else its error
    from metanet_jax import checkpointing

    return checkpointing.load_run(path, which)


load_model = load  # its earlier name


def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of all files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())
