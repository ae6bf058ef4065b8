"""What a training run was: its spec from its saved flags, its test protocol, its command.

A run folder or pretrained model records the flags of `experiments.omniglot` (config.json's
`"flags"`); from them `run_spec` rebuilds its `schema.RunSpec`, `protocol` the evaluation it
ran (`python -m experiments.evaluate` repeats it by default, `experiments.export_pretrained`
records it) and `training_command` the command that trains it again from its flagfile.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from experiments import run_data, schema, workdir
from metanet_jax import evaluation
from metanet_jax.config import MetaNetConfig
from metanet_jax.types import Params

# The repository root: flagfiles name the files they include from it.
ROOT = Path(__file__).resolve().parents[1]
# Every flag of the training program with its default, in the program's order.
_DEFAULTS = schema.RunSpec(workdir=None).to_dict()


# ----------------------------------------------------------------------------- protocol
def run_spec(flags: Mapping[str, Any], **overrides):
    """The `schema.RunSpec` of a saved flags dict (`workdir.saved_flags`: fields saved
    before they existed mean what the run did then), with `overrides`."""
    values = workdir.saved_flags(flags)
    values.update(overrides)
    values.setdefault("workdir", "")
    return schema.RunSpec.from_flags(values)


def protocol(flags: Mapping[str, Any], subset: str = "test") -> dict[str, Any]:
    """The evaluation protocol a run used for `subset` ("test" or "validation"), as its
    records hold it: the data (`dataset`, `split`, `subset`) and the episodes
    (`RunSpec.eval_protocol`: `ways`, `shots`, `queries_per_class`, `episodes`, `seed`,
    `batch`)."""
    spec = run_spec(flags)
    episodes = dataclasses.asdict(spec.eval_protocol(subset))
    return {"dataset": spec.data.dataset, "split": spec.data.split, "subset": subset, **episodes}


def mnist_protocol(flags: Mapping[str, Any]) -> dict[str, Any]:
    """The MNIST out-of-domain protocol of a run (`RunSpec.mnist_protocol`), as `protocol`."""
    episodes = dataclasses.asdict(run_spec(flags).mnist_protocol())
    return {"dataset": "mnist", "split": None, "subset": "test", **episodes}


def episodes(proto: Mapping[str, Any]) -> evaluation.Protocol:
    """The episodes of a recorded protocol (`protocol`'s form)."""
    names = [f.name for f in dataclasses.fields(evaluation.Protocol)]
    return evaluation.Protocol(**{k: proto[k] for k in names})


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
    images = run_data.load_splits(spec)[proto["subset"]]
    if images.shape[0] == 0:
        raise ValueError(
            f"the {proto['subset']} split of {spec.data.dataset}/{spec.data.split} is empty"
        )
    result = evaluation.measure(params, config, images, episodes(proto))
    return result, proto


# ----------------------------------------------------------------------------- flagfiles
# Flags that name places on one machine: never part of a reproduction command.
_LOCAL_FLAGS = frozenset({"workdir", "datasets", "mini_imagenet_dir"})


def parse_flagfile(path: str | os.PathLike) -> dict[str, str | bool]:
    """The flags of an `experiments/flags/*.flags` file: `{name: value string}` (`True` /
    `False` for `--name` / `--noname`), comments and blank lines skipped. A `--flagfile=`
    line is read in its place, as absl does (a later flag overrides an earlier one); its
    path is taken from the working directory, else from the repository's root.
    """
    fields = set(_DEFAULTS)
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
            if name == "flagfile":
                included = Path(value) if Path(value).is_file() else ROOT / value
                out.update(parse_flagfile(included))
            else:
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
    if isinstance(like, (list, tuple)):  # an integer-list flag ("5,10,15,20")
        return tuple(int(v) for v in value.split(",") if v)
    return value


def _flag_text(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return f"--{name}" if value else f"--no{name}"
    if isinstance(value, (list, tuple)):
        return f"--{name}={','.join(str(v) for v in value)}"
    return f"--{name}={value}"


def flag_overrides(flagfile: str | os.PathLike, run_flags: Mapping[str, Any]) -> list[str]:
    """The flags to add to `--flagfile=<flagfile>` to get `run_flags` (machine-local flags
    such as `--workdir` left out; a flag the run left unset but the flagfile sets cannot be
    expressed and is left out too)."""
    values = parse_flagfile(flagfile)
    out = []
    for name, default in _DEFAULTS.items():
        if name in _LOCAL_FLAGS:
            continue
        want = workdir.json_value(run_flags.get(name, default))
        if want is None:
            continue
        have = _typed(values[name], want) if name in values else default
        if want != have:
            out.append(_flag_text(name, want))
    return out


def find_flagfile(
    run_flags: Mapping[str, Any], flags_dir: str | os.PathLike = "experiments/flags"
) -> Path | None:
    """The flagfile whose `--workdir` is the run's workdir (the flagfiles' convention
    `workdirs/<name>`), or None.

    The two are compared as absolute paths with links resolved, a relative one taken from
    the current folder (the repository root, where the programs run): a run started with
    `--workdir=/abs/repo/workdirs/x` is the run of a flagfile's `--workdir=workdirs/x`.
    """
    workdir = run_flags.get("workdir")
    if not workdir or not Path(flags_dir).is_dir():
        return None
    want = _resolved(workdir)
    for path in sorted(Path(flags_dir).glob("*.flags")):
        value = parse_flagfile(path).get("workdir")
        if isinstance(value, str) and _resolved(value) == want:
            return path
    return None


def _resolved(path: str | os.PathLike) -> Path:
    return Path(path).expanduser().resolve()


def training_command(run_flags: Mapping[str, Any], flagfile: str | os.PathLike | None) -> str:
    """`python -m experiments.omniglot --flagfile=... [overrides]` that trains this run again
    (with `--workdir` from the flagfile), or every non-default flag without a flagfile."""
    if flagfile is not None:
        extra = flag_overrides(flagfile, run_flags)
        head = f"python -m experiments.omniglot --flagfile={Path(flagfile).as_posix()}"
        return " ".join([head, *extra])
    parts = ["python -m experiments.omniglot"]
    for name, default in _DEFAULTS.items():
        want = workdir.json_value(run_flags.get(name, default))
        if name in _LOCAL_FLAGS - {"workdir"} or want is None or want == default:
            continue
        parts.append(_flag_text(name, want))
    return " ".join(parts)
