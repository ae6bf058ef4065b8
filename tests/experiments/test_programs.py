"""The absl programs: flag validation (exit 1, one line, nothing created), flagfiles, signals."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from tests.experiments.conftest import TINY_FLAGS

ROOT = Path(__file__).resolve().parents[2]
FLAGFILES = sorted((ROOT / "experiments" / "flags").glob("*.flags"))


@pytest.fixture(scope="module", autouse=True)
def _shared_compilation_cache(tmp_path_factory):
    """The programs of this module share one persistent compilation cache (one compile each)."""
    cache = tmp_path_factory.mktemp("jax_cache")
    names = ("JAX_COMPILATION_CACHE_DIR", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ["JAX_COMPILATION_CACHE_DIR"] = str(cache)
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _run(args, timeout=300, **kwargs):
    return subprocess.run(
        [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        **kwargs,
    )  # fmt: skip


@pytest.mark.parametrize(
    "flag, named",
    [
        ("--ways=1", "--ways must be an integer in [2, 1000]"),
        ("--shots=0", "--shots must be an integer in [1, 100]"),
        ("--steps=0", "--steps must be an integer in [1, 100000000]"),
        ("--learning_rate=-1", "--learning_rate must be a number in (0, 1]"),
        ("--variant=metanet++", "--variant"),
        ("--queries_per_class=20", "must be <= 20"),
        ("--max_ways=3", "max_ways=3 must be an int >= ways=5"),
        ("--eval_ways=30", "--eval_ways=30 must be unset or <= --max_ways"),
        ("--architecture=mini_imagenet_cnn", "--dataset=mini_imagenet needs --architecture"),
        ("--lr_schedule=cosine", "lr_schedule='cosine' needs schedule_steps > warmup_steps"),
        ("--datasets=/no/such/folder", "--datasets must name an existing folder"),
        ("--meta_batch=abc", "--meta_batch"),
    ],
)
def test_a_bad_flag_exits_1_with_one_line_and_creates_nothing(tmp_path, flag, named):
    workdir = tmp_path / "never"
    out = _run(["-m", "experiments.omniglot", f"--workdir={workdir}", flag])
    assert out.returncode == 1, out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip() and "error" in x]
    assert len(lines) == 1, out.stderr
    assert named in lines[0]
    assert not workdir.exists()


def test_every_flagfile_parses_into_a_valid_model_configuration(tmp_path):
    script = textwrap.dedent(
        f"""
        import re
        import sys
        from pathlib import Path
        from absl import flags
        from experiments import omniglot, protocol, train
        FLAGS = flags.FLAGS
        for path in sys.argv[1:]:
            FLAGS.unparse_flags()
            try:
                FLAGS(["x", "--flagfile=" + path, "--workdir={tmp_path}/w"])
            except flags.Error as e:
                print("FLAGERROR", path, e)
                continue
            spec = omniglot.spec_from_flags()
            shape = (84, 84, 3) if spec.data.dataset == "mini_imagenet" else (28, 28, 1)
            train.model_config(spec, shape)
            # The hand parser (nested --flagfile lines included) reads what absl read.
            assert protocol.flag_overrides(path, spec.to_dict()) == [], path
            cell = re.fullmatch(r"(previous|standard)_(\\d+)way.*", Path(path).stem)
            if cell:  # a table's cell: the base file's flags, its own split and ways
                assert (spec.data.split, spec.model.ways) == (cell[1], int(cell[2])), path
                assert (spec.optim.steps, spec.model.max_ways) == (40000, 20), path
            print("OK", path)
        """
    )
    # experiments.continual defines flags of the same names: its flagfiles parse in a
    # process of their own, into its own spec and model configuration.
    continual_script = textwrap.dedent(
        f"""
        import sys
        from absl import flags
        from experiments import continual as program
        from experiments import continual_protocol
        FLAGS = flags.FLAGS
        for path in sys.argv[1:]:
            FLAGS.unparse_flags()
            FLAGS(["x", "--flagfile=" + path, "--workdir={tmp_path}/w"])
            names = continual_protocol.ContinualSpec(workdir="").to_dict()
            spec = continual_protocol.ContinualSpec.from_flags({{k: FLAGS[k].value for k in names}})
            config = spec.model
            assert config.architecture == "mlp", config
            print("OK", path)
        """
    )
    files = [str(p) for p in FLAGFILES if not p.name.startswith("continual")]
    continual_files = [str(p) for p in FLAGFILES if p.name.startswith("continual")]
    assert any(p.endswith("demo.flags") for p in files) and continual_files
    assert len(files) + len(continual_files) == len(FLAGFILES)
    out = _run(["-c", script, *files])
    assert out.returncode == 0, out.stderr
    for path in files:
        if "mini_imagenet" in path:
            assert f"FLAGERROR {path}" in out.stdout and "mini_imagenet_dir" in out.stdout
        else:
            assert f"OK {path}" in out.stdout, out.stdout + out.stderr
    out = _run(["-c", continual_script, *continual_files])
    assert out.returncode == 0, out.stderr
    for path in continual_files:
        assert f"OK {path}" in out.stdout, out.stdout + out.stderr


def test_a_cell_flagfile_run_from_outside_the_repository_names_where_to_run(tmp_path):
    """A table's cell includes its base file by a path from the repository's root (absl
    reads nested flagfiles from the working directory): elsewhere, one line says so."""
    flagfile = ROOT / "experiments" / "flags" / "previous_5way_metanet.flags"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-m", "experiments.omniglot", f"--flagfile={flagfile}",
         f"--workdir={tmp_path / 'w'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert out.returncode == 1
    lines = [x for x in out.stderr.splitlines() if "error" in x]
    assert len(lines) == 1 and "base/paper_omniglot.flags" in lines[0], out.stderr
    assert "run the programs from there" in lines[0]
    assert not (tmp_path / "w").exists()


def test_mini_imagenet_flagfile_fails_fast_on_the_missing_folder(tmp_path):
    workdir = tmp_path / "mini"
    t0 = time.time()
    flagfile = "--flagfile=experiments/flags/mini_imagenet_5way1shot.flags"
    out = _run(["-m", "experiments.omniglot", flagfile, f"--workdir={workdir}"])
    assert out.returncode == 1
    assert "--mini_imagenet_dir" in out.stderr
    assert not workdir.exists()
    assert time.time() - t0 < 60


def _wait_for_checkpoint(workdir, proc, timeout=240):
    deadline = time.time() + timeout
    ckpt = workdir / "checkpoints"
    while time.time() < deadline:
        if ckpt.is_dir() and any(p.name.isdigit() for p in ckpt.iterdir()):
            return
        if proc.poll() is not None:
            raise AssertionError(proc.stderr.read())
        time.sleep(0.2)
    raise AssertionError("no checkpoint appeared")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_saves_a_checkpoint_and_exits_cleanly(tmp_path, sig):
    workdir = tmp_path / "run"
    args = [sys.executable, "-m", "experiments.omniglot", f"--workdir={workdir}", *TINY_FLAGS,
            "--steps=100000", "--eval_every=100000", "--checkpoint_every=5"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        _wait_for_checkpoint(workdir, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert f"{sig.name} received: saved the checkpoint of step" in err


def test_sigkill_then_rerun_resumes_from_the_last_complete_checkpoint(tmp_path):
    workdir = tmp_path / "run"
    base = ["-m", "experiments.omniglot", f"--workdir={workdir}", *TINY_FLAGS, "--eval_every=1000"]
    proc = subprocess.Popen([sys.executable, *base, "--steps=100000", "--checkpoint_every=1"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip
    try:
        _wait_for_checkpoint(workdir, proc)
        time.sleep(1.0)
        os.kill(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    out = _run([*base, f"--steps={steps[-1] + 2}"])
    assert out.returncode == 0, out.stderr
    assert "resumed from step" in out.stderr
    assert (workdir / "results.json").exists()


def _fake_lake_runs(folder, runs=2, ways=3, size=28):
    """Lake's one-shot-runs layout with random stroke images (black on white PNGs)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for r in range(1, runs + 1):
        run = folder / f"run{r:02d}"
        (run / "training").mkdir(parents=True)
        (run / "test").mkdir()
        lines = []
        for k in range(1, ways + 1):
            for sub, name in (("training", f"class{k:02d}.png"), ("test", f"item{k:02d}.png")):
                img = np.where(rng.random((size, size)) < 0.2, 0, 255).astype(np.uint8)
                Image.fromarray(img).save(run / sub / name)
            lines.append(f"run{r:02d}/test/item{k:02d}.png run{r:02d}/training/class{k:02d}.png")
        (run / "class_labels.txt").write_text("\n".join(lines) + "\n")


def test_evaluate_program_on_lake_runs_prints_the_ci_line_and_writes_json(tmp_path):
    workdir = tmp_path / "run"
    # As on a user's first run: JAX probes every backend (no JAX_PLATFORMS) and matplotlib
    # builds its font cache (a fresh MPLCONFIGDIR); neither says so in the program's log.
    env = {k: v for k, v in os.environ.items() if k != "JAX_PLATFORMS"}
    env["MPLCONFIGDIR"] = str(tmp_path / "mpl")
    out = _run(["-m", "experiments.omniglot", f"--workdir={workdir}", *TINY_FLAGS, "--steps=2",
                "--synthetic_size=28"], env=env)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "test accuracy" in out.stdout
    assert (workdir / "learning_curve.png").is_file()  # matplotlib was used
    assert (tmp_path / "mpl").is_dir()  # and built its font cache there
    log = out.stderr.lower()
    assert "backend 'tpu'" not in log and "fontmanager" not in log and "font cache" not in log
    assert "starting a new run" in log  # the program's own INFO lines are still there
    _fake_lake_runs(tmp_path / "lake")
    out = _run(["-m", "experiments.evaluate", f"--workdir={workdir}", "--checkpoint=latest",
                f"--lake_runs_dir={tmp_path / 'lake'}"])  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert re.search(r"^accuracy \d\.\d{4} \+- \d\.\d{4} \(95% CI, 2 episodes\)$", out.stdout,
                     re.M), out.stdout  # fmt: skip
    saved = json.loads((workdir / "eval_lake_runs.json").read_text())
    assert saved["episodes"] == 2 and saved["checkpoint_step"] == 2
    # Every key evaluate writes, the protocol as null (Lake's runs have none).
    assert sorted(saved) == ["accuracy", "batch", "checkpoint", "checkpoint_step", "ci95",
                             "episodes", "lake_runs_dir", "protocol", "queries_per_class",
                             "seed", "shots", "trained", "versions"]  # fmt: skip
    assert saved["protocol"] is None and saved["lake_runs_dir"] == str(tmp_path / "lake")
    bad = _run(["-m", "experiments.evaluate", f"--workdir={tmp_path / 'none'}"])
    assert bad.returncode == 1 and "--workdir must name an existing run folder" in bad.stderr
