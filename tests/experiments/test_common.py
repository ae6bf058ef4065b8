"""experiments.common: programs' specs whose fields define their flags, and the flag parser."""

from __future__ import annotations

import dataclasses
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import ClassVar, Literal

import jax.numpy as jnp
import pytest
from absl import flags

from experiments import common, continual_protocol, train
from metanet_jax import config as config_lib
from metanet_jax.config import MetaNetConfig


@dataclasses.dataclass(frozen=True)
class _Toy(common.Spec):
    MODEL_FLAGS: ClassVar = {
        "ways": common.Flag("int", "Ways.", lo=2, hi=9),
        "variant": common.Flag("enum", "Variant.", choices=config_lib.VARIANTS),
    }

    workdir: str = common.workdir_field("Out.")
    rate: float = common.float_field(0.5, 0.0, 1.0, "Rate.")
    model: MetaNetConfig = MetaNetConfig(ways=3)
    size: int | None = common.int_field(None, 1, 4, "Size.", unset=True)
    fast: bool = common.bool_field(True, "Fast.")
    data: str | None = common.folder_field(None, "Data.")
    mode: str = common.enum_field("a", ("a", "b"), "Mode.")


@dataclasses.dataclass(frozen=True)
class _Other(common.Spec):
    workdir: str = common.workdir_field("Out.")
    rate: float = _Toy.flag_field("rate", 0.25)
    mode: str = _Toy.flag_field("mode")


def _parse(spec_cls, *args):
    values = flags.FlagValues()
    spec_cls.define_flags(values)
    values(["prog", *args])
    return values


def test_a_spec_defines_its_flags_and_reads_them_back(tmp_path):
    out = f"--workdir={tmp_path / 'w'}"
    values = _parse(_Toy, out)
    assert _Toy.flag_names() == ["workdir", "rate", "ways", "variant", "size", "fast", "data",
                                 "mode"]  # fmt: skip
    assert _Toy.from_flag_values(values) == _Toy(workdir=str(tmp_path / "w"))
    assert _Toy.from_flag_values(values).model == MetaNetConfig(ways=3)  # the field's default
    values = _parse(_Toy, out, "--rate=1", "--ways=9", "--variant=metanet+", "--size=4",
                    "--nofast", f"--data={tmp_path}", "--mode=b")  # fmt: skip
    spec = _Toy.from_flag_values(values)
    assert spec == _Toy(workdir=str(tmp_path / "w"), rate=1.0, size=4, fast=False,
                        data=str(tmp_path), mode="b",
                        model=MetaNetConfig(ways=9, variant="metanet+"))  # fmt: skip
    # Flat flags in the fields' order, the model's where `model` stands; and back.
    assert list(spec.to_dict()) == _Toy.flag_names()
    assert spec.to_dict()["ways"] == 9
    assert _Toy.from_flags(spec.to_dict()) == spec
    with pytest.raises(TypeError):
        _Toy.from_flags({"workdir": "w", "no_such_flag": 1})


@pytest.mark.parametrize(
    "arg, message",
    [
        ("--ways=10", "--ways must be an integer in [2, 9]"),
        ("--ways=1", "--ways must be an integer in [2, 9]"),
        ("--size=0", "--size must be an integer in [1, 4] (or unset)"),
        ("--rate=0", "--rate must be a number in (0, 1]"),
        ("--rate=1.5", "--rate must be a number in (0, 1]"),
        ("--variant=metanet++", "metanet+"),
        ("--mode=c", "should be one of <a|b>"),
        ("--data=/no/such/folder", "--data must name an existing folder"),
    ],
)
def test_each_kind_of_flag_checks_its_values(tmp_path, arg, message):
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
        _parse(_Toy, f"--workdir={tmp_path / 'w'}", arg)


def test_the_workdir_must_be_set_and_writable(tmp_path):
    with pytest.raises(flags.IllegalFlagValueError, match="--workdir must be set"):
        _parse(_Toy)
    (tmp_path / "file").write_text("")
    with pytest.raises(flags.IllegalFlagValueError, match="names a file"):
        _parse(_Toy, f"--workdir={tmp_path / 'file'}")


def test_a_flag_field_is_the_other_specs_flag_with_its_own_default(tmp_path):
    values = _parse(_Other, f"--workdir={tmp_path / 'w'}")
    assert _Other.from_flag_values(values) == _Other(workdir=str(tmp_path / "w"))
    assert (_Other(workdir="").rate, _Other(workdir="").mode) == (0.25, "a")
    assert values["rate"].help == "Rate."
    with pytest.raises(flags.IllegalFlagValueError, match=r"--rate must be a number in \(0, 1\]"):
        _parse(_Other, f"--workdir={tmp_path / 'w'}", "--rate=2")


@dataclasses.dataclass(frozen=True)
class _Inner(common.Spec):
    depth: int = common.int_field(1, 1, 9, "Depth.")


@dataclasses.dataclass(frozen=True)
class _Group(common.Spec):
    size: int = common.int_field(2, 1, 9, "Size.")
    inner: _Inner = _Inner(depth=5)  # a group in a group, with its own default


@dataclasses.dataclass(frozen=True)
class _Nested(common.Spec):
    MODEL_FLAGS: ClassVar = {"ways": common.Flag("int", "Ways.", lo=2, hi=9)}

    workdir: str = common.workdir_field("Out.")
    group: _Group = _Group(size=3)
    model: MetaNetConfig = MetaNetConfig(ways=4)
    mode: str = common.enum_field("a", ("a", "b"), "Mode.")


@dataclasses.dataclass(frozen=True)
class _Twice(common.Spec):
    size: int = common.int_field(1, 1, 9, "Size.")
    group: _Group = _Group()


def test_a_group_field_nests_its_flags_under_their_flat_names(tmp_path):
    """A field whose default is a Spec holds its flags (groups in groups too): flat names on
    the command line and in the dict, the group field's default for their defaults."""
    assert _Nested.flag_names() == ["workdir", "size", "depth", "ways", "mode"]
    assert _Nested.flag_table()["depth"][0] == ("group", "inner", "depth")
    values = _parse(_Nested, f"--workdir={tmp_path / 'w'}")
    assert (values["size"].default, values["depth"].default, values["ways"].default) == (3, 5, 4)
    assert _Nested.from_flag_values(values) == _Nested(workdir=str(tmp_path / "w"))
    spec = _Nested.from_flags({"workdir": "w", "depth": 7, "ways": 6})
    assert spec == _Nested(workdir="w", group=_Group(size=3, inner=_Inner(depth=7)),
                           model=MetaNetConfig(ways=6))  # fmt: skip
    assert spec.to_dict() == {"workdir": "w", "size": 3, "depth": 7, "ways": 6, "mode": "a"}
    assert _Nested.from_flags(spec.to_dict()) == spec
    with pytest.raises(TypeError, match="has no flag 'group'"):
        _Nested.from_flags({"workdir": "w", "group": _Group()})
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape("[1, 9]")):
        _parse(_Nested, f"--workdir={tmp_path / 'w'}", "--depth=10")
    # Another spec's flag, wherever it is nested there.
    assert _Nested.flag_field("depth", 2).metadata == dataclasses.fields(_Inner)[0].metadata
    assert _Nested.flag_field("depth").default == 5


def test_two_flags_of_one_name_are_refused():
    with pytest.raises(TypeError, match=r"two flags named 'size': size, group.size"):
        _Twice.flag_names()


@pytest.mark.parametrize("spec_cls", [train.RunSpec, continual_protocol.ContinualSpec])
def test_the_programs_model_flags_are_the_configs_fields_and_values(spec_cls):
    """Checked against MetaNetConfig itself: every model flag is a field of it, and an enum
    flag's choices are exactly the values the config accepts."""
    fields = {f.name for f in dataclasses.fields(MetaNetConfig)}
    assert set(spec_cls.MODEL_FLAGS) <= fields
    for name, flag in spec_cls.MODEL_FLAGS.items():
        if flag.kind != "enum":
            continue
        for choice in flag.choices:
            MetaNetConfig(**{name: choice}, schedule_steps=10)  # a cosine schedule needs steps
        with pytest.raises(ValueError, match=name):
            MetaNetConfig(**{name: "nonsense"})
    # Every other field is a flag: the spec's flat flags are what the program defines.
    values = flags.FlagValues()
    spec_cls.define_flags(values)
    assert set(spec_cls(workdir="").to_dict()) == set(values) == set(spec_cls.flag_names())


def test_parse_flags_refuses_a_flag_in_one_line(capsys):
    refused = {"flagfile": "name it with --run_flagfile"}
    for argv in (["prog", "--flagfile=x.flags"], ["prog", "-flagfile", "x.flags"]):
        with pytest.raises(SystemExit) as exit_info:
            common.parse_flags(argv, refused=refused)
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert err == "prog: error: --flagfile is refused: name it with --run_flagfile\n"


@dataclasses.dataclass(frozen=True)
class _Config:
    mode: Literal["a", "b"] = "a"
    fast: bool = True
    rate: float = 0.5
    size: int | None = None
    steps: int = 1
    name: str = "x"


def test_config_flags_take_their_kind_and_choices_from_the_field_types():
    table = {"mode": "Mode.", "fast": "Fast.", "rate": ("Rate.", 0.0, 1.0),
             "size": ("Size.", 1, 4), "steps": ("Steps.", 1, 9)}  # fmt: skip
    out = common.config_flags(_Config, table)
    assert list(out) == ["mode", "fast", "rate", "size", "steps"]
    assert out["mode"] == common.Flag("enum", "Mode.", choices=("a", "b"))
    assert out["fast"] == common.Flag("bool", "Fast.")
    assert out["rate"] == common.Flag("float", "Rate.", lo=0.0, hi=1.0)
    assert out["size"] == common.Flag("int", "Size.", lo=1, hi=4, unset=True)
    assert out["steps"] == common.Flag("int", "Steps.", lo=1, hi=9)
    with pytest.raises(TypeError, match="no flag kind"):
        common.config_flags(_Config, {"name": "Name."})


@pytest.mark.parametrize("arg", ["--train_ways=5,x", "--train_ways=5,5", "--train_ways=1,5"])
def test_an_integer_list_flag_checks_each_value(tmp_path, arg):
    message = "--train_ways must be a comma-separated list of distinct integers in [2, 1000]"
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(message)):
        _parse(train.RunSpec, f"--workdir={tmp_path / 'w'}", arg)
    values = _parse(train.RunSpec, f"--workdir={tmp_path / 'w'}", "--max_ways=20",
                    "--train_ways=5,20")  # fmt: skip
    assert train.RunSpec.from_flag_values(values).train_ways == (5, 20)


def test_the_library_filter_drops_backend_probing_and_the_font_cache_only():
    import logging as std_logging

    drop = common._DropLibraryInfo()

    def record(name, level, msg, path="/x/y.py"):
        return std_logging.LogRecord(name, level, path, 1, msg, None, None)

    tpu = "Unable to initialize backend 'tpu': INTERNAL: Failed to open libtpu.so"
    assert not drop.filter(record("jax._src.xla_bridge", std_logging.INFO, tpu))
    assert drop.filter(record("jax._src.xla_bridge", std_logging.WARNING, "no GPU found"))
    fm = "matplotlib.font_manager"
    assert not drop.filter(record(fm, std_logging.INFO, "generated new fontManager"))
    building = "Matplotlib is building the font cache; this may take a moment."
    assert not drop.filter(record(fm, std_logging.WARNING, building))
    assert drop.filter(record(fm, std_logging.WARNING, "findfont: Font family %r not found."))
    assert drop.filter(record("experiments.train", std_logging.INFO, "starting a new run"))


def test_the_programs_compile_flags_reach_xla_before_a_backend_starts():
    """A fresh process: `set_compile_flags` appends the flag, XLA starts with it (an unknown
    flag would abort the process) and compiles; a second call adds nothing."""
    code = (
        "import os; from experiments import common; common.set_compile_flags(); "
        "common.set_compile_flags(); import jax.numpy as jnp; "
        "print(float(jnp.arange(4.0).sum())); print(os.environ['XLA_FLAGS'])"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        cwd=Path(__file__).resolve().parents[2],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert out[0] == "6.0"
    assert out[1] == " ".join(common.CPU_COMPILE_FLAGS)


def test_a_users_xla_flag_wins_and_a_late_call_is_an_error(monkeypatch):
    """This process's backend has started (the tests compile): an option the user set is
    kept as it is, and a missing one can no longer take effect, which is an error."""
    jnp.zeros(1).block_until_ready()
    mine = "--xla_cpu_use_fusion_emitters=true --xla_force_host_platform_device_count=1"
    monkeypatch.setenv("XLA_FLAGS", mine)
    common.set_compile_flags()
    assert os.environ["XLA_FLAGS"] == mine
    monkeypatch.setenv("XLA_FLAGS", "")
    with pytest.raises(RuntimeError, match="after a JAX backend started"):
        common.set_compile_flags()


@pytest.mark.parametrize(
    "setting, tunables, restarts",
    [
        ("always [madvise] never", None, True),
        ("[always] madvise never", None, True),
        ("always madvise [never]", None, False),  # huge pages off: nothing to gain
        ("always [madvise] never", "glibc.malloc.arena_max=2", False),  # the user's wins
    ],
)
def test_a_program_restarts_with_huge_pages_only_where_they_help(
    monkeypatch, tmp_path, setting, tunables, restarts
):
    thp = tmp_path / "enabled"
    thp.write_text(setting + "\n")
    monkeypatch.setattr(common, "_THP_SETTING", str(thp))
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    if tunables is not None:
        monkeypatch.setenv("GLIBC_TUNABLES", tunables)
    argv = common.huge_pages_restart_argv()
    if sys.platform != "linux":
        assert argv is None
    elif restarts:
        assert argv == [sys.executable, *sys.orig_argv[1:]]
    else:
        assert argv is None


def test_the_restart_is_the_same_process_with_the_tunables_set(tmp_path):
    """A script that restarts itself: it runs twice in one process id, the second time with
    `GLIBC_TUNABLES` set, and the restart happens once."""
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    script = tmp_path / "prog.py"
    script.write_text(
        "import os, sys\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})\n"
        "from experiments import common\n"
        "print('start', os.getpid(), os.environ.get('GLIBC_TUNABLES'), flush=True)\n"
        "common.restart_with_huge_pages()\n"
        "print('after', os.getpid(), os.environ.get('GLIBC_TUNABLES'))\n"
    )
    probe = [sys.executable, "-c", "from experiments import common; "
             "print(common.huge_pages_restart_argv() is not None)"]  # fmt: skip
    root = Path(__file__).resolve().parents[2]
    applies = subprocess.run(probe, env=env, cwd=root, capture_output=True, text=True)
    if applies.stdout.strip() != "True":
        pytest.skip("no glibc with transparent huge pages here: the programs do not restart")
    out = subprocess.run(
        [sys.executable, str(script), "--flag=1"], env=env, capture_output=True, text=True
    )
    lines = out.stdout.split()
    pid = lines[1]
    assert lines == ["start", pid, "None", "start", pid, common.MALLOC_TUNABLES,
                     "after", pid, common.MALLOC_TUNABLES]  # fmt: skip
