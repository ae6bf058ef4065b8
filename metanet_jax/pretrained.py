"""Pretrained models: a trained run's parameters in a small, pickle-free folder.

A pretrained folder (`pretrained/<name>/` in the repository, or any folder of this layout):

* `params.npz`: the parameters theta only (no optimiser state, no step, no key): one array
  per leaf of the params tree, named by its path joined with "/" (`base/conv_0/kernel`).
  `np.load(path, allow_pickle=False)` reads it; nothing in it executes code on loading.
* `config.json`: the training run's `config.json` (every flag of the run, so its split,
  validation classes, evaluation queries and batch are known; the model configuration; the
  library versions of the training run).
* `results.json`: `test_accuracy`, `test_ci95`, `test_episodes` measured by
  `evaluate_run` (the protocol `python -m experiments.evaluate` runs by default) on the
  machine given by `test_platform`, the protocol itself (`test_protocol`), the run's flags
  (`config`: `ways`, `shots`, `split`, ...), the training run's `steps`, `wall_time_s`,
  `hardware` and `evaluated_step` (the checkpoint exported), and `training_run`: what the
  training run itself measured (its own test, possibly on another machine).

`load_pretrained(name_or_path)` reads one (offline: a name is a folder of the repository's
`pretrained/`); `export(workdir, dest)` writes one from a run folder's best checkpoint
(`python -m experiments.export_pretrained`). The evaluation here is the same code as
`experiments.evaluate`'s, so `python -m experiments.evaluate --workdir=pretrained/<name>`
prints the recorded accuracy again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
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
MAX_TOTAL_BYTES = 5_000_000  # all of the repository's pretrained/ together
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


def load_model(
    workdir: str | os.PathLike, which: str = "best"
) -> tuple[MetaNetConfig, Params, dict[str, Any]]:
    """`(config, params, meta)` of a pretrained folder or of a run folder's checkpoint."""
    if is_pretrained(workdir):
        return load_pretrained_with_meta(workdir)
    from metanet_jax import evaluation

    return evaluation.load_checkpoint_with_meta(workdir, which)


# ----------------------------------------------------------------------------- protocol
def run_spec(flags: Mapping[str, Any], **overrides):
    """The `experiment.RunSpec` of a saved flags dict (`experiment.saved_flags`: fields saved
    before they existed mean what the run did then), with `overrides`."""
    from metanet_jax import experiment

    values = experiment.saved_flags(flags)
    values.update(overrides)
    values.setdefault("workdir", "")
    return experiment.RunSpec(**values)


def protocol(flags: Mapping[str, Any], subset: str = "test") -> dict[str, Any]:
    """The evaluation protocol a run used for `subset` ("test" or "validation").

    Test: `test_episodes` episodes of `TEST_SEED`; validation: `eval_episodes` of
    `VALIDATION_SEED`; both `eval_ways`-way (else `ways`, as the training run tested)
    `shots`-shot with `eval_queries_per_class` queries per class, `eval_batch` episodes per
    batch (the batch decides which episodes are drawn), on the run's data set and split,
    without rotations.
    """
    from metanet_jax import experiment

    if subset not in ("test", "validation"):
        raise ValueError(f"subset must be 'test' or 'validation', got {subset!r}")
    spec = run_spec(flags)
    test = subset == "test"
    return {
        "dataset": spec.dataset,
        "split": spec.split,
        "subset": subset,
        "ways": spec.test_ways(),
        "shots": spec.shots,
        "queries_per_class": spec.eval_queries_per_class,
        "episodes": spec.test_episodes if test else spec.eval_episodes,
        "seed": experiment.TEST_SEED if test else experiment.VALIDATION_SEED,
        "batch": spec.eval_batch,
    }


def evaluate_run(
    params: Params,
    config: MetaNetConfig,
    flags: Mapping[str, Any],
    *,
    datasets: str | None = None,
    **changes,
):
    """Accuracy of a trained model under its run's protocol (`protocol`), with `changes`.

    Args:
      params, config: the model.
      flags: the run's flags (config.json's `flags`).
      datasets: the offline data folder (default `$METANET_DATASETS`).
      **changes: protocol entries to change (`subset`, `split`, `ways`, `shots`,
        `queries_per_class`, `episodes`, `seed`, `batch`); `None` values are ignored. A
        different `subset` takes that subset's protocol first; a `split` makes it Omniglot.

    Returns:
      `(EvalResult, protocol)`: the result and the protocol it ran.
    """
    from metanet_jax import evaluation, experiment

    changes = {k: v for k, v in changes.items() if v is not None}
    unknown = set(changes) - set(protocol(flags)) - {"subset"}
    if unknown:
        raise ValueError(f"unknown protocol entries {sorted(unknown)}")
    proto = protocol(flags, changes.get("subset", "test"))
    proto.update(changes)
    spec_changes: dict[str, Any] = {"datasets": datasets}
    if "split" in changes:
        spec_changes.update(dataset="omniglot", split=changes["split"])
    proto["dataset"] = spec_changes.get("dataset", proto["dataset"])
    spec = run_spec(flags, **spec_changes)
    images = experiment.load_splits(spec)[proto["subset"]]
    if images.shape[0] == 0:
        raise ValueError(f"the {proto['subset']} split of {spec.dataset}/{spec.split} is empty")
    result = evaluation.evaluate_classes(
        params,
        config,
        images,
        ways=proto["ways"],
        shots=proto["shots"],
        queries_per_class=proto["queries_per_class"],
        episodes=proto["episodes"],
        seed=proto["seed"],
        batch_size=proto["batch"],
    )
    return result, proto


# ----------------------------------------------------------------------------- export
def folder_size(folder: str | os.PathLike) -> int:
    """Bytes of all files under `folder`."""
    return sum(p.stat().st_size for p in Path(folder).rglob("*") if p.is_file())


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _validation_curve(workdir: Path) -> list[list[float]]:
    """`[[step, validation accuracy, wall time from the first record (s)], ...]`."""
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return []
    from metanet_jax.logging_utils import read_metrics

    records = read_metrics(path)
    t0 = records[0].get("wall_time") if records else None
    out = []
    for r in records:
        if "validation_accuracy" in r:
            wall = r.get("wall_time")
            out.append(
                [int(r["step"]), float(r["validation_accuracy"]),
                 None if wall is None or t0 is None else round(float(wall - t0), 1)]
            )  # fmt: skip
    return out


def _mean_episodes_per_s(workdir: Path) -> float | None:
    path = workdir / "metrics.jsonl"
    if not path.is_file():
        return None
    from metanet_jax.logging_utils import read_metrics

    rates = [r["episodes_per_s"] for r in read_metrics(path) if "episodes_per_s" in r]
    return float(np.mean(rates)) if rates else None


def export(
    source: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    which: str = "best",
    evaluate: bool = True,
    datasets: str | None = None,
    info: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Writes a pretrained folder from a run folder (its `which` checkpoint) or re-exports a
    pretrained folder (re-measuring its test accuracy here).

    Args:
      source: a training run's workdir (`checkpoints/`, `config.json`, maybe `results.json`
        and `metrics.jsonl`) or a pretrained folder (e.g. one written on a GPU).
      dest: the folder to write (replaced atomically; must not exist unless `overwrite`).
      which: "best" or "latest" checkpoint (run folders only).
      evaluate: measure the test accuracy here with `evaluate_run` (the run's protocol);
        without it the training run's own test numbers are recorded (as measured there).
      datasets: offline data folder for the evaluation.
      info: extra entries for results.json (e.g. `hardware`, `flagfile`, `command`).
      overwrite: replace an existing `dest`.

    Returns:
      The content of the written results.json.

    Raises:
      FileExistsError: `dest` exists and not `overwrite`. FileNotFoundError, ValueError,
        checkpointing.CheckpointError: the source cannot be read.
    """
    from metanet_jax import logging_utils

    source, dest = Path(source), Path(dest)
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest} exists; pass overwrite=True (--overwrite) to replace it")
    config, params, meta = load_model(source, which)
    params = jax.device_get(params)
    flags = dict(meta.get("flags") or {})
    if is_pretrained(source):
        saved_config = json.loads((source / CONFIG_FILE).read_text())
        run_results = dict(meta.get("results") or {})
        prior_run = run_results.get("training_run")
    else:
        config_path = source / CONFIG_FILE
        if config_path.is_file():
            saved_config = json.loads(config_path.read_text())
        else:  # checkpoints carry the flags and the model configuration too
            saved_config = {"flags": flags, "model_config": meta.get("model_config")}
        results_path = source / RESULTS_FILE
        run_results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        prior_run = None
    flags = dict(saved_config.get("flags") or flags)
    step = meta.get("step")
    if prior_run is None:
        prior_run = {
            k: run_results.get(k)
            for k in ("test_accuracy", "test_ci95", "test_episodes", "platform", "devices",
                      "evaluated_step", "best_validation_accuracy", "mnist_accuracy",
                      "mnist_ci95", "mnist_episodes")
            if run_results.get(k) is not None
        }  # fmt: skip
    results: dict[str, Any] = {
        "name": dest.name,
        "config": flags,
        "model_config": saved_config.get("model_config"),
        "steps": run_results.get("steps", meta.get("step")),
        "evaluated_step": step,
        "best_validation_accuracy": run_results.get("best_validation_accuracy"),
        "wall_time_s": run_results.get("wall_time_s", meta.get("wall_time_s")),
        "episodes_per_s": run_results.get("episodes_per_s") or _mean_episodes_per_s(source),
        "platform": run_results.get("platform"),
        "devices": run_results.get("devices"),
        "processes": run_results.get("processes"),
        "hardware": run_results.get("hardware"),
        "validation_curve": run_results.get("validation_curve") or _validation_curve(source),
        "training_run": prior_run,
    }
    # What the source recorded beside (flagfile, command, how the training stopped, ...); its
    # measurements stay in `training_run` (only this export's own are top-level).
    measured = {"test_accuracy", "test_ci95", "test_episodes", "test_protocol",
                "test_platform", "test_time_s", "mnist_accuracy", "mnist_ci95",
                "mnist_episodes", "versions", "params", "name"}  # fmt: skip
    for k, v in run_results.items():
        if k not in results and k not in measured and v is not None:
            results[k] = v
    if evaluate:
        t0 = time.time()
        result, proto = evaluate_run(params, config, flags, datasets=datasets)
        results.update(
            test_accuracy=result.mean,
            test_ci95=result.ci95,
            test_episodes=result.episodes,
            test_protocol=proto,
            test_platform=jax.default_backend(),
            test_time_s=round(time.time() - t0, 1),
        )
    else:
        results.update(
            test_accuracy=prior_run.get("test_accuracy"),
            test_ci95=prior_run.get("test_ci95"),
            test_episodes=prior_run.get("test_episodes"),
            test_protocol=protocol(flags),
            test_platform=prior_run.get("platform"),
        )
    results.update(info or {})
    results["versions"] = logging_utils.library_versions()

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        save_params(tmp / PARAMS_FILE, params)
        logging_utils.write_json_atomic(tmp / CONFIG_FILE, saved_config)
        results["params"] = {
            "file": PARAMS_FILE,
            "count": int(sum(np.size(v) for v in flatten_params(params).values())),
            "bytes": (tmp / PARAMS_FILE).stat().st_size,
            "sha256": _sha256(tmp / PARAMS_FILE),
        }
        logging_utils.write_json_atomic(tmp / RESULTS_FILE, results)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return results


# ----------------------------------------------------------------------------- flagfiles
# Flags that name places on one machine: never part of a reproduction command.
_LOCAL_FLAGS = frozenset({"workdir", "datasets", "mini_imagenet_dir"})


def parse_flagfile(path: str | os.PathLike) -> dict[str, str | bool]:
    """The flags of an `experiments/flags/*.flags` file: `{name: value string}` (`True` /
    `False` for `--name` / `--noname`), comments and blank lines skipped."""
    from metanet_jax import experiment

    fields = {f.name for f in dataclasses.fields(experiment.RunSpec)}
    out: dict[str, str | bool] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if not line.startswith("--"):
            raise ValueError(f"{path}: cannot read the line {raw!r}")
        body = line[2:]
        if "=" in body:
            name, value = body.split("=", 1)
            out[name] = value
        elif body.startswith("no") and body[2:] in fields and body not in fields:
            out[body[2:]] = False
        else:
            out[body] = True
    return out


def _typed(value: str | bool, like: Any) -> Any:
    """A flagfile value converted to the type of `like` (a RunSpec value)."""
    if isinstance(like, bool) or isinstance(value, bool):
        return value if isinstance(value, bool) else value.lower() in ("1", "true")
    if isinstance(like, int):
        return int(value)
    if isinstance(like, float):
        return float(value)
    return value


def _flag_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    return f"--{name}={value}"


def flag_overrides(flagfile: str | os.PathLike, run_flags: Mapping[str, Any]) -> list[str]:
    """The flags to add to `--flagfile=<flagfile>` to get `run_flags` (machine-local flags
    such as `--workdir` left out; a flag the run left unset but the flagfile sets cannot be
    expressed and is left out too)."""
    from metanet_jax import experiment

    values = parse_flagfile(flagfile)
    out = []
    for f in dataclasses.fields(experiment.RunSpec):
        if f.name in _LOCAL_FLAGS:
            continue
        want = run_flags.get(f.name, f.default)
        if want is None:
            continue
        have = _typed(values[f.name], want) if f.name in values else f.default
        if want != have:
            out.append(_flag_text(f.name, want))
    return out


def find_flagfile(
    run_flags: Mapping[str, Any], flags_dir: str | os.PathLike = "experiments/flags"
) -> Path | None:
    """The flagfile whose `--workdir` is the run's workdir (the flagfiles' convention
    `workdirs/<name>`), or None."""
    workdir = run_flags.get("workdir")
    if not workdir or not Path(flags_dir).is_dir():
        return None
    want = os.path.normpath(str(workdir))
    for path in sorted(Path(flags_dir).glob("*.flags")):
        value = parse_flagfile(path).get("workdir")
        if isinstance(value, str) and os.path.normpath(value) == want:
            return path
    return None


def training_command(run_flags: Mapping[str, Any], flagfile: str | os.PathLike | None) -> str:
    """`python -m experiments.omniglot --flagfile=... [overrides]` that trains this run again
    (with `--workdir` from the flagfile), or every non-default flag without a flagfile."""
    from metanet_jax import experiment

    if flagfile is not None:
        extra = flag_overrides(flagfile, run_flags)
        head = f"python -m experiments.omniglot --flagfile={Path(flagfile).as_posix()}"
        return " ".join([head, *extra])
    parts = ["python -m experiments.omniglot"]
    for f in dataclasses.fields(experiment.RunSpec):
        want = run_flags.get(f.name, f.default)
        if f.name in _LOCAL_FLAGS - {"workdir"} or want is None or want == f.default:
            continue
        parts.append(_flag_text(f.name, want))
    return " ".join(parts)
