"""Flag helpers shared by the experiment programs: a parser that turns any flag error into
one line on stderr and exit status 1, before any work is done (the validated definitions are
`experiments.flag_definitions`), and the programs' specs (`Spec`), frozen dataclasses whose
fields define the programs' flags.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import typing
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, ClassVar, NoReturn, TypeVar

from absl import flags

from experiments.flag_definitions import (
    define_float,
    define_folder,
    define_int,
    define_ints,
    register_workdir_validator,
)

MAX_INT = 2**31 - 1


# glibc's malloc with transparent huge pages for its large blocks: XLA's CPU runtime allocates
# its buffers afresh at every execution (tens of MB per train step, above malloc's mmap
# threshold), so with 4 KiB pages every step faults them in page by page, which costs as much
# system time as a third of the step (README, Performance). glibc reads the variable only
# when a process starts.
MALLOC_TUNABLES = "glibc.malloc.hugetlb=1"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_restart_argv() -> list[str] | None:
    """The command that restarts this program with `GLIBC_TUNABLES=MALLOC_TUNABLES`, or `None`
    where it would change nothing or is not ours to change: not Linux with glibc, transparent
    huge pages off (`never`), or `GLIBC_TUNABLES` already set (the user's setting wins)."""
    import platform

    if sys.platform != "linux" or "GLIBC_TUNABLES" in os.environ:
        return None
    if platform.libc_ver()[0] != "glibc":
        return None
    try:
        with open(_THP_SETTING) as f:
            if "[never]" in f.read():
                return None
    except OSError:
        return None
    return [sys.executable, *sys.orig_argv[1:]]


def restart_with_huge_pages() -> None:
    """Restarts this program (`os.execv`: same process id, arguments and open files) with
    `GLIBC_TUNABLES=MALLOC_TUNABLES` when `huge_pages_restart_argv` says so; else returns.
    Call it first in a program's `__main__` block, before the slow imports, and never from a
    process that has started threads or a JAX backend."""
    argv = huge_pages_restart_argv()
    if argv is not None:
        os.environ["GLIBC_TUNABLES"] = MALLOC_TUNABLES
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(argv[0], argv)


def handle_startup_signals(prog: str | None = None, detail: str = "nothing to save") -> None:
    """SIGINT and SIGTERM print one line and exit at once with status 128 + their number.

    Call it first in a program, before the slow imports (JAX): without it a SIGTERM during
    start-up ends the process silently (status 143) and a SIGINT prints a traceback. The
    training loop installs its own handlers (save a checkpoint and stop) and restores these.
    The exit is `os._exit`: an exception raised by a signal handler can land in code that
    swallows it (a garbage-collection callback during JAX's start-up did). While these
    handlers are in force the programs write only config.json and the data caches, each to a
    temporary name then renamed, so nothing half-written is left under its real name (a
    first-time data preparation stopped this way leaves what a SIGKILL would).
    """
    import signal

    prog = prog or os.path.basename(sys.argv[0])

    def handler(signum, frame):
        del frame
        code = 128 + signum
        name = signal.Signals(signum).name
        sys.stderr.write(f"{prog}: {name} received outside the training loop ({detail}): "
                         f"exiting with status {code}\n")  # fmt: skip
        sys.stderr.flush()
        os._exit(code)

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, handler)


def define_distributed_flags(flag_values=flags.FLAGS) -> None:
    """`--coordinator_address`, `--num_processes`, `--process_id`: a run of several processes
    (docs/SCALING.md), validated together at parse time.

    None of them: one process, or JAX's auto-detection inside a multi-process cluster job (an
    `srun` step of several tasks, Open MPI, a multi-host Cloud TPU slice, a Kubernetes
    JobSet). All three: an explicit run of `--num_processes` processes.
    `--num_processes=1` alone: one process, auto-detection off.
    """
    flags.DEFINE_string(
        "coordinator_address", None,
        "host:port of process 0's coordinator, for a run of several processes (with "
        "--num_processes and --process_id; unset: one process or auto-detection).",
        flag_values=flag_values,
    )  # fmt: skip
    define_int("num_processes", None, 1, 65536,
               "Processes in the run (1: one process, auto-detection off).", allow_none=True,
               flag_values=flag_values)  # fmt: skip
    define_int("process_id", None, 0, 65535, "This process's index in [0, --num_processes).",
               allow_none=True, flag_values=flag_values)  # fmt: skip

    @flags.multi_flags_validator(
        ["coordinator_address", "num_processes", "process_id"], flag_values=flag_values
    )
    def _together(v):
        address, n, pid = v["coordinator_address"], v["num_processes"], v["process_id"]
        if address is None and pid is None and n in (None, 1):
            return True
        if address is None or n is None or pid is None:
            raise flags.ValidationError(
                "--coordinator_address, --num_processes and --process_id must be set together "
                "(or none of them: one process, or auto-detection by the cluster manager)"
            )
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise flags.ValidationError(
                f"--coordinator_address={address} must be host:port with a port in [1, 65535]"
            )
        if pid >= n:
            raise flags.ValidationError(f"--process_id={pid} must be in [0, --num_processes={n})")
        return True


def start_distributed(flag_values=flags.FLAGS) -> None:
    """Starts JAX's multi-process runtime from the distributed flags (or the cluster
    environment). Call it first in `main`, before anything touches a JAX backend; exits with
    one line on failure. Processes other than 0 then log warnings and errors only."""
    from absl import logging

    from metanet_jax import parallel

    try:
        parallel.initialize_distributed(
            flag_values.coordinator_address, flag_values.num_processes, flag_values.process_id
        )
    except (ValueError, RuntimeError) as e:
        fail(f"cannot start the processes of a distributed run: {e}")
    if not parallel.is_primary():
        logging.set_verbosity(logging.WARNING)


def parse_flags(argv: list[str], refused: Mapping[str, str] | None = None) -> list[str]:
    """`app.run`'s `flags_parser`: one-line error and exit status 1 on any bad flag.

    Args:
      argv: the command line.
      refused: flags the program refuses before absl reads any (`{name: why}`), e.g.
        absl's own `--flagfile` where a user would mean another flag of the program.
    """
    prog = os.path.basename(argv[0]) if argv else "program"
    for arg in argv[1:]:
        if arg == "--":  # absl reads no flag after it
            break
        name = arg.lstrip("-").split("=", 1)[0]
        if arg.startswith("-") and name in (refused or {}):
            _flag_error(prog, f"--{name} is refused: {refused[name]}")
    try:
        return flags.FLAGS(argv)
    except flags.CantOpenFlagFileError as e:
        hint = (
            "the flagfiles of experiments/flags include their base files by paths from the "
            "repository's root: run the programs from there"
        )
        _flag_error(prog, f"{e} ({hint})")
    except flags.Error as e:
        _flag_error(prog, str(e))


def _flag_error(prog: str, message: str) -> NoReturn:
    sys.stderr.write(f"{prog}: error: {' '.join(message.split())}\n")
    sys.exit(1)


def fail(message: str) -> None:
    """Stops with a one-line error and exit status 1."""
    sys.stderr.write(f"error: {' '.join(message.split())}\n")
    sys.exit(1)


class _DropLibraryInfo:
    """A logging filter: drops orbax's INFO chatter (warnings and errors still pass), its
    warnings that a checkpoint folder opened for reading is read-only (by design), asyncio's
    reports of orbax's background reads of a checkpoint already reported corrupt, JAX's
    INFO records on backends it probed and did not find (e.g. "Unable to initialize backend
    'tpu'" on every machine without a TPU) and matplotlib's INFO records and its font-cache
    notice ("generated new fontManager", "Matplotlib is building the font cache": once per
    machine, when the plots or TFDS first import it); matplotlib's other warnings pass."""

    def filter(self, record) -> bool:
        import logging as std_logging

        info = record.levelno < std_logging.WARNING
        if record.name.startswith("jax._src.xla_bridge"):
            return not info
        if record.name.startswith("matplotlib"):
            return not info and "building the font cache" not in str(record.msg)
        if record.name == "asyncio" and "exception was never retrieved" in str(record.msg):
            # orbax's background reads of a damaged checkpoint fail again after the restore
            # has failed and been reported (checkpointing names the file and the cause).
            return False
        noisy = "/orbax/" in record.pathname or "/tensorstore/" in record.pathname
        msg = str(record.msg)
        if noisy and "tracked_metric" in msg:
            return False  # checkpoints saved without validation metrics: by design
        if noisy and ("read_only=True" in msg or "Given directory is read only" in msg):
            return False  # evaluation opens checkpoints read-only: by design
        return not noisy or not info


def quiet_libraries() -> None:
    """Keeps the log readable: progress lines, not orbax's per-save INFO records, JAX's
    backend probing or matplotlib's font cache (`_DropLibraryInfo`). Call it first in
    `main`, before anything starts a JAX backend (which logs its probing at once); calling
    it again adds nothing."""
    from absl import logging

    handler = logging.get_absl_handler()
    if not any(isinstance(f, _DropLibraryInfo) for f in handler.filters):
        handler.addFilter(_DropLibraryInfo())


# XLA's CPU compiler with its older (non-MLIR) fusion emitters: the same operations, compiled
# in about a third less time at an unchanged step time (benchmarks/startup.py), and compiling
# is most of a short run's start-up. Results are a float rounding apart at most; the tests
# compile with the same setting (tests/conftest.py). Only the CPU backend reads it.
CPU_COMPILE_FLAGS = ("--xla_cpu_use_fusion_emitters=false",)


def start_main(argv: list[str]) -> None:
    """The opening of a program's `main`: refuses positional arguments (one line, status 1),
    then `quiet_libraries` and `set_compile_flags`, before anything starts a JAX backend."""
    if len(argv) > 1:
        fail(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_libraries()
    set_compile_flags()


def set_compile_flags() -> None:
    """Appends `CPU_COMPILE_FLAGS` to `XLA_FLAGS`, except an option the variable names
    already (the user's setting wins). Call it in `main` before anything starts a JAX
    backend: XLA reads the variable then, once.

    Raises:
      RuntimeError: a flag is missing and a backend has started (it would not take effect).
    """
    from jax._src import xla_bridge

    def option(flag: str) -> str:  # "--name=value" -> "name"
        return flag.lstrip("-").split("=", 1)[0]

    current = os.environ.get("XLA_FLAGS", "")
    named = {option(f) for f in current.split()}
    extra = [f for f in CPU_COMPILE_FLAGS if option(f) not in named]
    if not extra:
        return
    if xla_bridge.backends_are_initialized():
        raise RuntimeError(
            f"set_compile_flags() ran after a JAX backend started: {' '.join(extra)} would "
            "not take effect (call it first in main)"
        )
    os.environ["XLA_FLAGS"] = " ".join([current, *extra]).strip()


# ----------------------------------------------------------------------------- specs
# A program's spec is a frozen dataclass whose fields are its flags: a field's default is its
# flag's, and its `Flag` (in the field's metadata) the flag's checks and help, so that the
# program defines its flags from the spec (`Spec.define_flags`) and each is stated once.
_FLAG = "flag"


@dataclasses.dataclass(frozen=True)
class Flag:
    """How a value is defined as a command-line flag (its default comes from the spec).

    Attributes:
      kind: "int" (in `[lo, hi]`), "ints" (a list of distinct ones), "float" (in `(lo, hi]`),
        "enum" (one of `choices`),
        "bool", "folder" (a folder that exists when set and `must_exist`) or "workdir" (must
        be set, to a folder this user can create or write: `register_workdir_validator`).
      help: the flag's help text.
      lo, hi: the bounds of "int" and "float".
      choices: the values of "enum".
      unset: an "int" that may be `None` (its default only: absl parses no `None`).
      must_exist: whether a set "folder" must exist.
    """

    kind: str
    help: str
    lo: float | None = None
    hi: float | None = None
    choices: tuple[str, ...] = ()
    unset: bool = False
    must_exist: bool = True

    def define(self, name: str, default: Any, flag_values=flags.FLAGS) -> None:
        """Defines `--name` with `default` and registers its checks."""
        fv = flag_values
        if self.kind == "int":
            define_int(name, default, self.lo, self.hi, self.help, allow_none=self.unset,
                       flag_values=fv)  # fmt: skip
        elif self.kind == "ints":
            define_ints(name, default, self.lo, self.hi, self.help, flag_values=fv)
        elif self.kind == "float":
            define_float(name, default, self.lo, self.hi, self.help, flag_values=fv)
        elif self.kind == "enum":
            flags.DEFINE_enum(name, default, self.choices, self.help, flag_values=fv)
        elif self.kind == "bool":
            flags.DEFINE_bool(name, default, self.help, flag_values=fv)
        elif self.kind == "folder":
            define_folder(name, default, self.help, must_exist=self.must_exist, flag_values=fv)
        elif self.kind == "workdir":
            flags.DEFINE_string(name, default, self.help, flag_values=fv)
            register_workdir_validator(name, flag_values=fv)
        else:
            raise ValueError(f"--{name}: unknown flag kind {self.kind!r}")


def int_field(default: int | None, lo: int, hi: int, help_text: str, *, unset: bool = False):
    """A spec field that is an integer flag in `[lo, hi]` (or `None` when `unset`)."""
    return _field(default, Flag("int", help_text, lo=lo, hi=hi, unset=unset))


def ints_field(default: tuple[int, ...], lo: int, hi: int, help_text: str):
    """A spec field that is a comma-separated list of distinct integers in `[lo, hi]`."""
    return _field(default, Flag("ints", help_text, lo=lo, hi=hi))


def float_field(default: float, lo: float, hi: float, help_text: str):
    """A spec field that is a number flag in `(lo, hi]`."""
    return _field(default, Flag("float", help_text, lo=lo, hi=hi))


def enum_field(default: str, choices: Iterable[str], help_text: str):
    """A spec field that is one of `choices`."""
    return _field(default, Flag("enum", help_text, choices=tuple(choices)))


def bool_field(default: bool, help_text: str):
    """A spec field that is a boolean flag (`--name` / `--noname`)."""
    return _field(default, Flag("bool", help_text))


def folder_field(default: str | None, help_text: str, *, must_exist: bool = True):
    """A spec field that names a folder (existing, when set and `must_exist`)."""
    return _field(default, Flag("folder", help_text, must_exist=must_exist))


def workdir_field(help_text: str):
    """The spec's required run folder: a folder this user can create or write."""
    return dataclasses.field(metadata={_FLAG: Flag("workdir", help_text)})


def _field(default: Any, flag: Flag):
    return dataclasses.field(default=default, metadata={_FLAG: flag})


def config_flags(config_cls, table: Mapping[str, str | tuple[str, float, float]]):
    """The flags of a configuration dataclass's fields: `{name: Flag}`, in `table`'s order.

    Args:
      config_cls: the dataclass (e.g. `MetaNetConfig`); each flag's kind comes from its
        field's type: a `Literal` is an "enum" of its values, `bool` a "bool", `float` a
        "float", `int` an "int" (`int | None`: one that may be unset).
      table: `{name: help}`, or `{name: (help, lo, hi)}` for the numbers.
    """
    types = typing.get_type_hints(config_cls)
    out = {}
    for name, entry in table.items():
        help_text, lo, hi = (entry, None, None) if isinstance(entry, str) else entry
        kind, choices, unset = _kind(types[name])
        out[name] = Flag(kind, help_text, lo=lo, hi=hi, choices=choices, unset=unset)
    return out


def _kind(annotation) -> tuple[str, tuple[str, ...], bool]:
    """A field type's flag kind, its choices and whether it may be unset (`None`)."""
    if typing.get_origin(annotation) is typing.Literal:
        return "enum", typing.get_args(annotation), False
    args = typing.get_args(annotation)
    unset = type(None) in args
    if unset:
        (annotation,) = [a for a in args if a is not type(None)]
    kinds = {bool: "bool", float: "float", int: "int"}
    if annotation not in kinds:
        raise TypeError(f"no flag kind for a field of type {annotation!r}")
    return kinds[annotation], (), unset


_S = TypeVar("_S", bound="Spec")


class Spec:
    """The base of the programs' specs: frozen dataclasses whose fields are flags (`*_field`)
    or groups of flags: a field whose default is itself a `Spec` (flags nested by concern)
    or `model`, a `MetaNetConfig` whose flags are `MODEL_FLAGS`.

    Each flag has one flat name across the groups: the command line's and config.json's.
    `flag_table` maps it to its place in the nested object; `from_flags` / `to_dict` convert
    between the flat flags and the nested spec, for every spec, here only.

    `MODEL_FLAGS` (`{name: Flag}`, in flag order) are the `MetaNetConfig` fields the program
    sets by flags; the spec holds them in its `model` field, whose default gives theirs.
    """

    MODEL_FLAGS: ClassVar[Mapping[str, Flag]] = {}

    @classmethod
    def flag_table(cls) -> dict[str, tuple[tuple[str, ...], Flag, Any]]:
        """`{flat name: (path, Flag, default)}` of every flag, in the fields' order (a group's
        flags where the group stands): `path` the attributes that reach its value (`("optim",
        "steps")`), `default` the spec's (`dataclasses.MISSING` for a required one).

        Raises:
          TypeError: a field that is no flag nor group, or two flags of one name.
        """
        table: dict[str, tuple[tuple[str, ...], Flag, Any]] = {}
        for name, path, flag, default in _flags_of(cls, cls.MODEL_FLAGS, None):
            if name in table:
                was, now = ".".join(table[name][0]), ".".join(path)
                raise TypeError(f"{cls.__name__}: two flags named {name!r}: {was}, {now}")
            table[name] = (path, flag, default)
        return table

    @classmethod
    def from_flags(cls: type[_S], flags: Mapping[str, Any]) -> _S:
        """The spec of flat flags (`{"workdir": ..., "ways": 5, "steps": 10, ...}`): each sets
        its field in its group (`flag_table`); the others keep the spec's defaults.

        Raises:
          TypeError: a name that is no flag (named). ValueError: a spec or model the flags do
            not allow (its checks, `MetaNetConfig` validation, e.g. `learning_rate=0`).
        """
        table = cls.flag_table()
        unknown = [k for k in flags if k not in table]
        if unknown:
            raise TypeError(f"{cls.__name__} has no flag {', '.join(map(repr, unknown))}")
        return _build(cls, None, flags, cls.MODEL_FLAGS)

    def to_dict(self) -> dict[str, Any]:
        """The flat flags (config.json's `"flags"`), the inverse of `from_flags`."""
        out: dict[str, Any] = {}
        for name, (path, _, _) in self.flag_table().items():
            value = self
            for attr in path:
                value = getattr(value, attr)
            out[name] = value
        return out

    @classmethod
    def flag_names(cls) -> list[str]:
        """The flat flags' names, in the order of `to_dict`."""
        return list(cls.flag_table())

    @classmethod
    def flag_field(cls, name: str, default: Any = dataclasses.MISSING):
        """A field of another program's spec that is this spec's flag `name` (its checks and
        help, wherever it is nested here), with `default` or this spec's."""
        _, flag, own = cls.flag_table()[name]
        default = own if default is dataclasses.MISSING else default
        return dataclasses.field(default=default, metadata={_FLAG: flag})

    @classmethod
    def define_flags(cls, flag_values=flags.FLAGS) -> None:
        """Defines a flag for every flat flag (`flag_table`), with the spec's default."""
        for name, (_, flag, default) in cls.flag_table().items():
            default = None if default is dataclasses.MISSING else default
            flag.define(name, default, flag_values)

    @classmethod
    def from_flag_values(cls: type[_S], flag_values=flags.FLAGS) -> _S:
        """The spec of the parsed flags that `define_flags` defined.

        Raises:
          ValueError: a model the flags do not allow.
        """
        return cls.from_flags({k: flag_values[k].value for k in cls.flag_names()})


def _flags_of(spec_cls, model_flags, defaults) -> Iterator[tuple[str, tuple, Flag, Any]]:
    """`(name, path, Flag, default)` of `spec_cls`'s flags, its groups' in their place;
    `defaults`: the instance whose values are the defaults (`None`: the fields')."""
    for f in dataclasses.fields(spec_cls):
        default = f.default if defaults is None else getattr(defaults, f.name)
        if _FLAG in f.metadata:
            yield f.name, (f.name,), f.metadata[_FLAG], default
        elif isinstance(default, Spec):
            for name, path, flag, value in _flags_of(type(default), model_flags, default):
                yield name, (f.name, *path), flag, value
        elif f.name == "model":
            for name, flag in model_flags.items():
                yield name, ("model", name), flag, getattr(default, name)
        else:
            raise TypeError(f"{spec_cls.__name__}.{f.name} is no flag, group of flags or model")


def _build(spec_cls, base, flags: Mapping[str, Any], model_flags):
    """`spec_cls` with the flat `flags` that are its own or its groups' set, from `base`
    (an instance) or, for `None`, from the fields' defaults."""
    values: dict[str, Any] = {}
    for f in dataclasses.fields(spec_cls):
        was = f.default if base is None else getattr(base, f.name)
        if _FLAG in f.metadata:
            if f.name in flags:
                values[f.name] = flags[f.name]
        elif isinstance(was, Spec):
            values[f.name] = _build(type(was), was, flags, model_flags)
        elif f.name == "model":
            model = {k: v for k, v in flags.items() if k in model_flags}
            values["model"] = dataclasses.replace(was, **model)
    return spec_cls(**values) if base is None else dataclasses.replace(base, **values)
