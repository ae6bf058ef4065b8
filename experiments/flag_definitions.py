"""Validated flag definitions: an absl flag whose value is checked at parse time (an integer
or number in its range, a list of distinct integers, an existing folder, a run folder that
can be created or written), so that a bad value is one line naming the flag and its allowed
range (`common.parse_flags`), before anything is done. `common.Flag` defines a spec's flags
with these.
"""

from __future__ import annotations

import os
from pathlib import Path

from absl import flags


def define_int(name, default, lo, hi, help_text, *, allow_none=False, flag_values=flags.FLAGS):
    """An integer flag that must lie in `[lo, hi]` (or be unset when `allow_none`)."""
    flags.DEFINE_integer(name, default, help_text, flag_values=flag_values)
    rng = f"an integer in [{lo}, {hi}]" + (" (or unset)" if allow_none else "")
    flags.register_validator(
        name,
        lambda v: (v is None and allow_none) or (v is not None and lo <= v <= hi),
        message=f"--{name} must be {rng}",
        flag_values=flag_values,
    )


def define_float(name, default, lo, hi, help_text, *, flag_values=flags.FLAGS):
    """A float flag that must lie in `(lo, hi]`."""
    flags.DEFINE_float(name, default, help_text, flag_values=flag_values)
    flags.register_validator(
        name,
        lambda v: v is not None and lo < v <= hi,
        message=f"--{name} must be a number in ({lo:g}, {hi:g}]",
        flag_values=flag_values,
    )


def define_ints(name, default, lo, hi, help_text, *, flag_values=flags.FLAGS):
    """A comma-separated list of distinct integers in `[lo, hi]` (empty allowed)."""
    flags.DEFINE_list(name, [str(v) for v in default], help_text, flag_values=flag_values)

    def valid(values) -> bool:
        try:
            ints = [int(v) for v in values]
        except ValueError:
            return False
        return len(set(ints)) == len(ints) and all(lo <= v <= hi for v in ints)

    flags.register_validator(
        name,
        valid,
        message=f"--{name} must be a comma-separated list of distinct integers in [{lo}, {hi}]",
        flag_values=flag_values,
    )


def define_folder(name, default, help_text, *, must_exist=True, flag_values=flags.FLAGS):
    """A folder flag; when set (and `must_exist`), the folder must exist."""
    flags.DEFINE_string(name, default, help_text, flag_values=flag_values)
    if must_exist:
        flags.register_validator(
            name,
            lambda v: not v or os.path.isdir(os.path.expanduser(v)),
            message=f"--{name} must name an existing folder",
            flag_values=flag_values,
        )


def define_run_folder(help_text: str, *, flag_values=flags.FLAGS) -> None:
    """The `--workdir` of a program that reads a finished run: it must name an existing
    folder (a run folder, or a pretrained-format one)."""
    flags.DEFINE_string("workdir", None, help_text, flag_values=flag_values)
    flags.register_validator(
        "workdir",
        lambda v: bool(v) and os.path.isdir(v),
        message="--workdir must name an existing run folder",
        flag_values=flag_values,
    )


def workdir_problem(path: str, name: str = "workdir") -> str | None:
    """Why `path` cannot be a run folder, in one line, or `None` (creates nothing).

    A run folder is an existing folder this user can write in, or a path whose nearest
    existing ancestor is such a folder (it is created there).
    """
    p = Path(os.path.expanduser(path))
    if p.exists() and not p.is_dir():
        return f"--{name}={path} names a file, not a folder"
    if p.is_symlink() and not p.exists():
        return f"--{name}={path} is a broken symbolic link"
    probe = p
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        return f"--{name}={path} cannot be created: {probe} is a file, not a folder"
    if not os.access(probe, os.W_OK | os.X_OK):
        where = "in it" if probe == p else f"in {probe}, so it cannot be created"
        return f"--{name}={path}: this user cannot write {where} (permission denied)"
    return None


def register_workdir_validator(name: str = "workdir", flag_values=flags.FLAGS) -> None:
    """`--<name>` must be set and name a folder that can be created or written
    (`workdir_problem`); checked at parse time, before anything is created."""

    def check(value):
        if not value:
            raise flags.ValidationError(f"--{name} must be set to a folder path")
        problem = workdir_problem(value, name)
        if problem:
            raise flags.ValidationError(problem)
        return True

    flags.register_validator(name, check, flag_values=flag_values)
