"""Faults a hostile user or a bad disk can cause (issue 10, section 4), each survived.

Rule: where the run can recover (an earlier good checkpoint exists) it warns in one line
naming the file and the cause, sets the bad checkpoint aside (renamed, never deleted),
continues from the good one and finishes; where it cannot, one line naming the cause, exit
status 1, nothing renamed or deleted. The library's loaders (`mn.load_checkpoint`,
`experiments.evaluate`) detect and fall back exactly as training does, but never rename
anything (they only read).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import metanet_jax as mn
from experiments import flag_definitions, schema, train
from metanet_jax import checkpointing, data, evaluation
from tests.conftest import tiny_config
from tests.experiments.conftest import TINY_FLAGS, replace

ROOT = Path(__file__).resolve().parents[2]


# Arrays large enough to be stored as raw data in tensorstore's data files (the smallest ones
# are inlined into its b-tree nodes, whose corruption tensorstore detects by itself): a flipped
# byte there decodes into other numbers, as in the fault injection.
CONFIG = tiny_config(conv_channels=8, hidden_units=32)


# ----------------------------------------------------------------------------- helpers
def _state(seed=0, step=0, config=CONFIG):
    opt = mn.make_optimizer(config)
    state = mn.init_train_state(mn.init(jax.random.key(seed), config), opt, jax.random.key(seed))
    return state._replace(step=state.step + step)


def _meta(config=CONFIG):
    return {"model_config": checkpointing.config_to_dict(config)}


def _equal(a, b):
    return jax.tree.all(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b))


def _data_files(step_dir):
    """The tensorstore data files of a checkpoint's arrays (largest first)."""
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and p.parent.name == "d"]
    assert files
    return sorted(files, key=lambda p: -p.stat().st_size)


def _truncate(step_dir):
    for p in _data_files(step_dir):
        p.write_bytes(b"")


def _flip_bytes(step_dir):
    """XORs three bytes in the middle of the largest data file (what the fault injection did)."""
    path = _data_files(step_dir)[0]
    assert path.parent.parent.name.startswith("ocdbt.process")  # raw array data
    data = bytearray(path.read_bytes())
    for at in (len(data) // 3, len(data) // 2, 2 * len(data) // 3):
        data[at] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap_state(step_dir):
    """Replaces the arrays of a checkpoint with those of the previous one: readable, other
    values (deterministic, unlike a flipped byte)."""
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.with_name(str(int(step_dir.name) - 1)) / "state", step_dir / "state")


def _garbage_metrics(step_dir):
    (step_dir / "metrics" / "metrics").write_text("garbage\n")


def _garbage_meta(step_dir):
    (step_dir / "meta" / "metadata").write_text("{trunc")


def _set_aside(directory, step):
    return sorted(p.name for p in directory.iterdir() if p.name.startswith(f"{step}.corrupt-"))


def _save(directory, states, accuracies=None, config=CONFIG):
    accuracies = accuracies or [None] * len(states)
    with checkpointing.Checkpointer(directory, keep=10) as ck:
        for state, acc in zip(states, accuracies, strict=True):
            ck.save(state, _meta(config), validation_accuracy=acc)


# ----------------------------------------------------------------------------- flipped bytes
def test_a_state_that_differs_from_its_digests_is_corrupt_and_the_previous_is_used(tmp_path):
    """Readable arrays with other values than were saved (what a flipped byte in a data file
    does when the file still decodes): found by the digests recorded at save."""
    directory = tmp_path / "ck"
    _save(directory, [_state(step=1), _state(step=2)])
    other = tmp_path / "other"
    _save(other, [_state(seed=5, step=2)])  # same structure and step, other values
    shutil.rmtree(directory / "2" / "state")
    shutil.copytree(other / "2" / "state", directory / "2" / "state")
    messages = []
    with checkpointing.Checkpointer(directory) as ck:
        with pytest.raises(checkpointing.CorruptCheckpoint, match="digest"):
            ck.restore(2, _state())
        restored, meta = ck.restore_latest(_state(seed=9), warn=messages.append)
    assert int(restored.step) == 1 and meta["step"] == 1
    assert _equal(restored.params, _state(step=1).params)
    assert len(messages) == 1, messages
    assert str(directory / "2") in messages[0] and "digest" in messages[0]
    assert "step 1" in messages[0]
    assert _set_aside(directory, 2) == ["2.corrupt-digest"]  # renamed, not deleted
    with checkpointing.Checkpointer(directory) as ck:
        assert ck.steps() == [1]


def test_three_flipped_bytes_in_a_data_file_never_load(tmp_path):
    directory = tmp_path / "ck"
    _save(directory, [_state(step=1), _state(step=2)])
    _flip_bytes(directory / "2")
    messages = []
    with checkpointing.Checkpointer(directory, read_only=True) as ck:
        with pytest.raises(checkpointing.CorruptCheckpoint):
            ck.restore(2, _state())
        restored, _ = ck.restore_latest(_state(), warn=messages.append)
    assert int(restored.step) == 1
    assert len(messages) == 1 and str(directory / "2") in messages[0]
    assert (directory / "2").is_dir()  # read-only: left in place


def test_a_checkpoint_without_digests_loads_with_one_warning(tmp_path):
    """A checkpoint written before the integrity check existed (saved exactly as the previous
    `Checkpointer.save` did) is not corrupt: it loads, with one line saying so."""
    directory = tmp_path / "ck"
    state = _state(step=3)
    options = ocp.CheckpointManagerOptions(create=True, enable_async_checkpointing=False)
    with ocp.CheckpointManager(directory, options=options, item_names=("state", "meta")) as m:
        m.save(3, args=ocp.args.Composite(
            state=ocp.args.StandardSave(checkpointing.state_to_tree(state)),
            meta=ocp.args.JsonSave(dict(_meta(), step=3))), force=True)  # fmt: skip
        m.wait_until_finished()
    messages = []
    with checkpointing.Checkpointer(directory) as ck:
        restored, meta = ck.restore_latest(_state(seed=4), warn=messages.append)
        assert ck.steps() == [3]
    assert _equal(restored.params, state.params) and meta["step"] == 3
    assert len(messages) == 1 and "no integrity digest" in messages[0]
    assert str(directory / "3") in messages[0]


# ----------------------------------------------------------------------------- metrics, meta
def test_garbage_metrics_name_their_path_and_the_previous_checkpoint_is_used(tmp_path):
    directory = tmp_path / "ck"
    _save(directory, [_state(step=1), _state(step=2)], [0.5, 0.6])
    _garbage_metrics(directory / "2")
    messages = []
    with checkpointing.Checkpointer(directory) as ck:
        restored, _ = ck.restore_latest(_state(), warn=messages.append)
        assert int(restored.step) == 1
        assert ck.steps() == [1] and ck.best_step() == 1
    assert len(messages) == 1
    assert str(directory / "2" / "metrics" / "metrics") in messages[0]
    assert _set_aside(directory, 2) == ["2.corrupt-metrics"]


def _edit_json(path, key, value):
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))


@pytest.mark.parametrize(
    "edit, reason",
    [
        # Valid JSON that is not what was saved: a better validation accuracy (would change
        # which checkpoint is "best"), an edited wall time in meta.
        (lambda d: _edit_json(d / "metrics" / "metrics", "validation_accuracy", 0.99), "metrics"),
        (lambda d: _edit_json(d / "meta" / "metadata", "wall_time_s", 1.0), "meta"),
    ],
)
def test_edited_but_valid_json_is_corrupt_too(tmp_path, edit, reason):
    directory = tmp_path / "ck"
    with checkpointing.Checkpointer(directory, keep=10) as ck:
        ck.save(_state(step=1), dict(_meta(), wall_time_s=5.0), validation_accuracy=0.5)
        ck.save(_state(step=2), dict(_meta(), wall_time_s=9.0), validation_accuracy=0.6)
    edit(directory / "2")
    with checkpointing.Checkpointer(directory, read_only=True) as ck:
        with pytest.raises(checkpointing.CorruptCheckpoint) as e:
            ck.restore(2, _state())
        assert e.value.reason == reason
        _, meta = ck.restore_best(_state(), warn=lambda m: None)
    assert meta["step"] == 1


def test_nothing_readable_is_one_error_and_nothing_is_renamed(tmp_path):
    directory = tmp_path / "ck"
    _save(directory, [_state(step=1), _state(step=2)], [0.5, None])
    _garbage_metrics(directory / "1")
    _truncate(directory / "2")
    with checkpointing.Checkpointer(directory) as ck:
        with pytest.raises(checkpointing.CheckpointError, match="refusing to start again") as e:
            ck.restore_latest(_state(), warn=lambda m: None)
    assert "\n" not in str(e.value)
    assert str(directory / "1" / "metrics" / "metrics") in str(e.value)
    assert sorted(p.name for p in directory.iterdir() if p.name[0].isdigit()) == ["1", "2"]


# ----------------------------------------------------------------------------- the loaders
def _workdir_with(tmp_path, fault, which_step):
    """A workdir with checkpoints 1 (val 0.5), 2 (val 0.9, the best), 3 (latest, no metrics),
    one of them damaged by `fault`."""
    workdir = tmp_path / "run"
    directory = evaluation.checkpoint_dir(workdir)
    _save(directory, [_state(seed=s, step=s) for s in (1, 2, 3)], [0.5, 0.9, None])
    fault(directory / str(which_step))
    return workdir, directory


@pytest.mark.parametrize("fault", [_garbage_meta, _truncate, _flip_bytes])
def test_load_checkpoint_latest_falls_back_like_training(tmp_path, caplog, fault):
    workdir, directory = _workdir_with(tmp_path, fault, 3)
    with caplog.at_level(logging.WARNING):
        config, params = mn.load_checkpoint(workdir, "latest")
    assert config == CONFIG
    assert _equal(params, _state(seed=2).params)
    assert str(directory / "3") in caplog.text and "falling back" in caplog.text
    assert (directory / "3").is_dir() and not _set_aside(directory, 3)  # a reader renames nothing


@pytest.mark.parametrize("fault", [_garbage_metrics, _truncate])
def test_load_checkpoint_best_falls_back_to_the_next_best(tmp_path, caplog, fault):
    workdir, directory = _workdir_with(tmp_path, fault, 2)
    with caplog.at_level(logging.WARNING):
        _, params, meta = evaluation.load_checkpoint_with_meta(workdir, "best")
    assert meta["step"] == 1 and _equal(params, _state(seed=1).params)
    assert str(directory / "2") in caplog.text


def _run(args, timeout=300):
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


def _error_lines(stderr):
    return [x for x in stderr.splitlines() if x.startswith("error:") or "Traceback" in x]


def test_the_evaluate_program_falls_back_or_stops_in_one_line(tmp_path):
    from tests.experiments.test_programs import _fake_lake_runs

    config = tiny_config(image_shape=(28, 28, 1), max_ways=3)
    workdir = tmp_path / "run"
    directory = evaluation.checkpoint_dir(workdir)
    _save(directory, [_state(seed=s, step=s, config=config) for s in (1, 2)], [0.5, 0.9],
          config=config)  # fmt: skip
    _garbage_metrics(directory / "2")
    _fake_lake_runs(tmp_path / "lake")
    args = ["-m", "experiments.evaluate", f"--workdir={workdir}",
            f"--lake_runs_dir={tmp_path / 'lake'}"]  # fmt: skip
    out = _run(args)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Event loop is closed" not in out.stderr
    assert str(directory / "2" / "metrics" / "metrics") in out.stderr
    assert json.loads((workdir / "eval_lake_runs.json").read_text())["checkpoint_step"] == 1
    _truncate(directory / "1")
    out = _run(args)
    assert out.returncode == 1
    assert len(_error_lines(out.stderr)) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "Event loop is closed" not in out.stderr
    assert (directory / "1").is_dir() and (directory / "2").is_dir()


# ----------------------------------------------------------------------------- training runs
@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "fault, reason",
    [(_truncate, "unreadable"), (_swap_state, "digest"), (_garbage_metrics, "metrics")],
)
def test_a_corrupt_final_checkpoint_is_set_aside_and_the_same_command_finishes(
    spec_factory, caplog, fault, reason
):
    spec = spec_factory(steps=3, keep_checkpoints=3)
    train.train_and_evaluate(spec)
    directory = evaluation.checkpoint_dir(spec.workdir)
    fault(directory / "3")
    with caplog.at_level(logging.INFO):
        out = train.train_and_evaluate(spec)  # the same command again
    assert out["status"] == "completed"
    assert "resumed from step 2" in caplog.text
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "corrupt" in r.msg]
    assert len(warnings) == 1 and str(directory / "3") in warnings[0].getMessage()
    assert _set_aside(directory, 3) == [f"3.corrupt-{reason}"]
    assert (directory / "3").is_dir()  # trained and saved again
    results = json.loads((Path(spec.workdir) / "results.json").read_text())
    assert results["evaluated_step"] in (2, 3)


def test_closed_event_loop_reports_of_a_failed_restore_are_dropped_and_nothing_else(
    monkeypatch,
):
    """After orbax fails to read one array, tensorstore's other reads complete on a closed
    event loop: each reports `RuntimeError: Event loop is closed` through
    `sys.unraisablehook` (hundreds of tracebacks in the fault injection). Those, and only
    those, are dropped."""
    import asyncio
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    monkeypatch.setattr(checkpointing, "_QUIETED", False)
    checkpointing._quiet_closed_event_loops()
    loop = asyncio.new_event_loop()
    loop.close()
    with pytest.raises(RuntimeError, match="Event loop is closed") as closed:
        loop.call_soon_threadsafe(print)
    try:
        raise RuntimeError("Event loop is closed")  # same text, not from asyncio
    except RuntimeError as e:
        other = e
    for exc in (closed.value, other):
        sys.unraisablehook(types.SimpleNamespace(
            exc_type=RuntimeError, exc_value=exc, exc_traceback=exc.__traceback__,
            err_msg=None, object=None))  # fmt: skip
    assert [u.exc_value for u in seen] == [other]


def test_sigint_during_the_final_test_stops_it_saying_so(spec_factory, caplog, monkeypatch):
    spec = spec_factory(steps=2)
    batches = data.fixed_eval_episodes

    def interrupt_the_test(seed, *args, **kwargs):
        if seed == schema.TEST_SEED:
            os.kill(os.getpid(), signal.SIGINT)
        return batches(seed, *args, **kwargs)

    monkeypatch.setattr(data, "fixed_eval_episodes", interrupt_the_test)
    with caplog.at_level(logging.WARNING):
        out = train.train_and_evaluate(spec)
    assert out["status"] == "interrupted" and out["signal"] == "SIGINT"
    lines = [r.getMessage() for r in caplog.records if "SIGINT" in r.getMessage()]
    assert len(lines) == 1 and "final test" in lines[0], lines
    assert not (Path(spec.workdir) / "results.json").exists()
    monkeypatch.setattr(data, "fixed_eval_episodes", batches)
    assert train.train_and_evaluate(spec)["status"] == "completed"  # the rerun tests


def test_a_signal_during_start_up_exits_with_one_line():
    script = (
        "import os, signal, time\n"
        "from experiments import common\n"
        "common.handle_startup_signals('prog')\n"
        "os.kill(os.getpid(), signal.SIGTERM)\n"
        "time.sleep(30)\n"
    )
    out = _run(["-c", script], timeout=60)
    assert out.returncode == 128 + signal.SIGTERM
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1, out.stderr
    assert "SIGTERM" in lines[0] and "outside the training loop" in lines[0]


def test_the_window_after_a_resume_says_how_many_steps_it_averages(spec_factory, caplog):
    spec = spec_factory(steps=3, log_every=2, eval_every=100)
    train.train_and_evaluate(spec)
    with caplog.at_level(logging.INFO):
        train.train_and_evaluate(replace(spec, steps=6))
    records = [json.loads(x) for x in open(os.path.join(spec.workdir, "metrics.jsonl"))]
    windows = {r["step"]: r["window_steps"] for r in records if "loss" in r}
    assert windows == {2: 2, 3: 1, 4: 1, 6: 2}
    assert "step 4/6" in caplog.text
    assert "averages of the 1 step since the resume at step 3" in caplog.text


# ----------------------------------------------------------------------------- --workdir
def test_a_workdir_naming_a_file_is_one_line_and_exit_1(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("x")
    out = _run(["-m", "experiments.omniglot", f"--workdir={path}", *TINY_FLAGS])
    assert out.returncode == 1
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and f"--workdir={path} names a file" in lines[0], out.stderr
    assert path.read_text() == "x"
    assert f"{path} is a file" in flag_definitions.workdir_problem(str(path / "below"))


def test_an_unwritable_workdir_is_refused_before_any_work(tmp_path, monkeypatch):
    (tmp_path / "ro").mkdir()
    real_access = os.access
    monkeypatch.setattr(
        os, "access", lambda p, mode: False if "ro" in Path(p).parts else real_access(p, mode)
    )
    assert "cannot write" in flag_definitions.workdir_problem(str(tmp_path / "ro"))
    assert "cannot write" in flag_definitions.workdir_problem(str(tmp_path / "ro" / "new" / "run"))
    assert flag_definitions.workdir_problem(str(tmp_path / "new" / "run")) is None
    assert flag_definitions.workdir_problem(str(tmp_path)) is None


def test_a_workdir_the_run_cannot_create_is_one_error_naming_it(spec_factory, monkeypatch):
    spec = spec_factory()

    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(train.WorkdirError, match="cannot create or write") as e:
        train.train_and_evaluate(spec)
    assert spec.workdir in str(e.value) and "Permission denied" in str(e.value)
