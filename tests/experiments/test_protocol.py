"""experiments.protocol: a run's test protocol and training command from its saved flags."""

from __future__ import annotations

import os
from pathlib import Path

from experiments import protocol, train


def test_flag_overrides_and_training_command(tmp_path):
    flagfile = tmp_path / "x.flags"
    flagfile.write_text("# a comment\n--ways=5\n--learning_rate=0.002\n--rotate\n"
                        "--norotations_as_classes\n--workdir=workdirs/x\n")  # fmt: skip
    run = train.RunSpec.from_flags(
        dict(workdir="elsewhere", ways=5, learning_rate=0.002, steps=7000)
    )
    assert protocol.flag_overrides(flagfile, run.to_dict()) == ["--steps=7000"]
    run = train.RunSpec.from_flags(
        dict(workdir="workdirs/x", ways=5, learning_rate=0.001, rotate=False)
    )
    # In the flat flags' order: the data's (rotate) before the model's.
    overrides = ["--norotate", "--learning_rate=0.001"]
    assert protocol.flag_overrides(flagfile, run.to_dict()) == overrides
    assert protocol.find_flagfile(run.to_dict(), tmp_path) == flagfile
    assert protocol.find_flagfile({"workdir": "workdirs/y"}, tmp_path) is None
    command = protocol.training_command(run.to_dict(), flagfile)
    assert command == (f"python -m experiments.omniglot --flagfile={flagfile.as_posix()} "
                       "--norotate --learning_rate=0.001")  # fmt: skip
    # An integer-list flag: the flagfile's text against config.json's list.
    flagfile.write_text("--ways=5\n--max_ways=20\n--train_ways=5,10,20\n--workdir=workdirs/x\n")
    run = train.RunSpec.from_flags(dict(workdir="x", max_ways=20, train_ways=[5, 10, 20]))
    saved = {**run.to_dict(), "train_ways": [5, 10, 20]}
    assert protocol.flag_overrides(flagfile, saved) == []
    saved["train_ways"] = [5, 20]
    assert protocol.flag_overrides(flagfile, saved) == ["--train_ways=5,20"]
    assert protocol.training_command(saved, None).endswith("--train_ways=5,20")
    # Without a flagfile, the default (an empty list in config.json) is no flag.
    default = train.RunSpec.from_flags(dict(workdir="x")).to_dict()
    assert protocol.training_command({**default, "train_ways": []}, None) == (
        "python -m experiments.omniglot --workdir=x"
    )


def test_find_flagfile_compares_workdirs_as_resolved_absolute_paths(tmp_path, monkeypatch):
    """Issue 11: a run started with `--workdir=/abs/repo/workdirs/b` (or through a link to
    that folder) is the run of the flagfile saying `--workdir=workdirs/b`, taken from the
    repository root where the programs run; a folder of the same name elsewhere is not."""
    flags_dir = tmp_path / "experiments" / "flags"
    flags_dir.mkdir(parents=True)
    (flags_dir / "a.flags").write_text("--ways=5\n--workdir=workdirs/a\n")
    (flags_dir / "b.flags").write_text("--ways=5\n--workdir=workdirs/b/\n")
    (tmp_path / "workdirs" / "b").mkdir(parents=True)
    os.symlink(tmp_path / "workdirs", tmp_path / "link")
    monkeypatch.chdir(tmp_path)
    b = Path("experiments/flags/b.flags")
    assert protocol.find_flagfile({"workdir": str(tmp_path / "workdirs" / "b")}) == b
    assert protocol.find_flagfile({"workdir": str(tmp_path / "link" / "b")}) == b
    assert protocol.find_flagfile({"workdir": "./workdirs/a"}) == Path("experiments/flags/a.flags")
    assert protocol.find_flagfile({"workdir": str(tmp_path / "other" / "workdirs" / "b")}) is None
    assert protocol.find_flagfile({"workdir": "workdirs/b"}, tmp_path / "nothing") is None


def test_protocol_tests_eval_ways_as_the_training_run_did():
    """A run trained 10-way and tested 5-way (`--eval_ways`, mini_imagenet_authors.flags) is
    re-tested 5-way; without eval_ways, at its training ways."""
    run = {"ways": 10, "max_ways": 10, "eval_ways": 5, "test_episodes": 7}
    assert protocol.protocol(run)["ways"] == 5
    assert protocol.protocol(run, "validation")["ways"] == 5
    assert protocol.protocol({"ways": 10, "test_episodes": 7})["ways"] == 10
