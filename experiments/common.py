"""Flag helpers shared by the experiment programs: validated definitions and a parser that
turns any flag error into one line on stderr and exit status 1, before any work is done.
"""

from __future__ import annotations

import os
import sys

from absl import flags

MAX_INT = 2**31 - 1


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


def parse_flags(argv: list[str]) -> list[str]:
    """`app.run`'s `flags_parser`: one-line error and exit status 1 on any bad flag."""
    try:
        return flags.FLAGS(argv)
    except flags.Error as e:
        prog = os.path.basename(argv[0]) if argv else "program"
        message = " ".join(str(e).split())
        sys.stderr.write(f"{prog}: error: {message}\n")
        sys.exit(1)


def fail(message: str) -> None:
    """Stops with a one-line error and exit status 1."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.exit(1)


class _DropLibraryInfo:
    """A logging filter: drops orbax's INFO chatter (warnings and errors still pass)."""

    def filter(self, record) -> bool:
        import logging as std_logging

        noisy = "/orbax/" in record.pathname or "/tensorstore/" in record.pathname
        if noisy and "tracked_metric" in str(record.msg):
            return False  # checkpoints saved without validation metrics: by design
        return not noisy or record.levelno >= std_logging.WARNING


def quiet_libraries() -> None:
    """Keeps the log readable: progress lines, not orbax's per-save INFO records."""
    from absl import logging

    logging.get_absl_handler().addFilter(_DropLibraryInfo())
