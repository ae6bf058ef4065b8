r"""Evaluate a trained workdir's best or latest checkpoint, or a pretrained model, on any N-way
K-shot setting.

  python -m experiments.evaluate --workdir=/tmp/run                      # the run's own test
  python -m experiments.evaluate --workdir=pretrained/demo               # a pretrained model
  python -m experiments.evaluate --workdir=/tmp/run --ways=20            # 20-way, its split
  python -m experiments.evaluate --workdir=/tmp/run --split=previous --ways=10
  python -m experiments.evaluate --workdir=/tmp/run --lake_runs_dir=~/one-shot-runs
  python -m experiments.evaluate --workdir=/tmp/run --mnist                 # 10-way 1-shot

Prints `accuracy 0.9712 +- 0.0031 (95% CI, 1000 episodes)` over a fixed, seeded set of episodes
(Lake runs: all runs) and writes `<workdir>/eval_<name>.json`. A model can be tested on up
to its output units (`--max_ways` at training) ways.

Every episode flag left unset takes the run's own protocol (`experiments.protocol`): its ways
and shots, `--eval_queries_per_class`, `--test_episodes` (`--eval_episodes` with the
validation seed for `--subset=validation`; `--mnist_test_episodes`, when set, for `--mnist`)
and `--eval_batch` (the batch decides which episodes are drawn). So with `--workdir` alone
it re-runs the run's final test, and on a pretrained folder (`params.npz`, `config.json`,
`results.json`; `metanet_jax.pretrained`) it prints the recorded accuracy again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from absl import app, flags, logging

from experiments import common
from experiments.flag_definitions import define_folder, define_int, define_run_folder

if __name__ == "__main__":  # before the slow imports (JAX): a signal from now on says so
    common.restart_with_huge_pages()  # malloc with huge pages: faster CPU steps
    common.handle_startup_signals(detail="nothing written")

from experiments import protocol, records, schema  # noqa: E402
from metanet_jax import evaluation, logging_utils  # noqa: E402
from metanet_jax.data import SPLIT_SCHEMES  # noqa: E402

FLAGS = flags.FLAGS

define_run_folder("The trained run's folder.")
flags.DEFINE_enum("checkpoint", "best", ("best", "latest"),
                  "Which checkpoint to evaluate (a pretrained folder holds one).")  # fmt: skip
define_int("ways", 5, 2, 1000, "Classes per episode (default: the run's).")
define_int("shots", 1, 1, 100, "Support examples per class (default: the run's).")
define_int("queries_per_class", 10, 1, 100,
           "Query examples per class (default: the run's eval queries).")  # fmt: skip
flags.DEFINE_enum(
    "split", None, SPLIT_SCHEMES, "Omniglot split scheme (default: the one the run trained on)."
)
flags.DEFINE_enum("subset", "test", ("test", "validation"), "Which classes of the split.")
define_int("episodes", 1000, 1, 10**6,
           "Episodes, fixed and seeded (default: the run's --test_episodes).")  # fmt: skip
define_int("seed", schema.TEST_SEED, 0, common.MAX_INT,
           "Seed of the episode set (default: the run's test/validation seed).")  # fmt: skip
define_int("batch", 50, 1, 10**4,
           "Episodes per evaluation batch (default: the run's --eval_batch).")  # fmt: skip
define_folder("lake_runs_dir", None, "Folder of Lake's one-shot runs (runNN/...).")
flags.DEFINE_bool("mnist", False, "MNIST 10-way one-shot, out of domain (--ways is ignored).")
define_folder("datasets", None, "Offline data folder (default: $METANET_DATASETS).")
flags.DEFINE_string("name", None, "Output name: eval_<name>.json (default: from the setting).")


@flags.multi_flags_validator(
    ["lake_runs_dir", "mnist"], message="--lake_runs_dir and --mnist are exclusive"
)
def _exclusive(v):
    return not (v["lake_runs_dir"] and v["mnist"])


def main(argv):
    common.start_main(argv)  # before a backend starts: JAX logs its probing, XLA reads flags
    from metanet_jax import pretrained

    # A corrupt checkpoint is reported in one warning line and the next candidate used, as
    # in training (the workdir is only read); no good one, or a configuration this version
    # cannot read: one line, status 1.
    try:
        config, params, meta = pretrained.load(FLAGS.workdir, FLAGS.checkpoint)
    except (FileNotFoundError, ValueError, evaluation.checkpointing.CheckpointError) as e:
        common.fail(str(e))
    run = meta.get("flags", {})
    step = meta.get("step")
    is_pretrained = pretrained.is_pretrained(FLAGS.workdir)
    what = "the pretrained model" if is_pretrained else f"the {FLAGS.checkpoint} checkpoint"
    logging.info("evaluating %s (step %s) in %s", what, step, FLAGS.workdir)
    try:
        result, name, setting, proto = _measure(params, config, run)
    except (ValueError, FileNotFoundError) as e:
        common.fail(str(e))
    name = FLAGS.name or name
    proto = proto or {}
    # Every field given is written, null included (Lake's runs have no protocol).
    out = records.EvalRecord.written(
        **setting,
        shots=proto.get("shots", FLAGS.shots),
        queries_per_class=proto.get("queries_per_class", FLAGS.queries_per_class),
        checkpoint="pretrained" if is_pretrained else FLAGS.checkpoint,
        checkpoint_step=step,
        episodes=result.episodes,
        seed=proto.get("seed", FLAGS.seed),
        batch=proto.get("batch", FLAGS.batch),
        accuracy=result.mean,
        ci95=result.ci95,
        protocol=proto or None,
        trained={k: run.get(k) for k in ("ways", "shots", "split", "variant", "steps")},
        versions=logging_utils.library_versions(),
    )
    path = os.path.join(FLAGS.workdir, f"eval_{name}.json")
    logging_utils.write_json_atomic(path, out.to_json())
    print(result.line(), flush=True)
    recorded = _recorded(meta, run, proto, is_pretrained)
    if recorded:
        print(f"recorded: {recorded}", flush=True)
    print(f"written: {path}", flush=True)
    logging.info("%s", json.dumps({"accuracy": result.mean, "ci95": result.ci95}))


_EPISODE_FLAGS = ("ways", "shots", "queries_per_class", "episodes", "seed", "batch")


def _measure(params, config, run):
    """The evaluation the flags ask for: Lake's runs, MNIST, or the run's protocol with the
    episode flags given.

    Returns:
      `(result, name, setting, protocol)`; the protocol is `None` for Lake's runs.
    """
    from metanet_jax import data

    given = {k: FLAGS[k].value for k in _EPISODE_FLAGS if FLAGS[k].present}
    if FLAGS.lake_runs_dir:
        runs = data.load_lake_runs(os.path.expanduser(FLAGS.lake_runs_dir))
        result = evaluation.evaluate_lake_runs(params, config, runs)
        return result, "lake_runs", {"lake_runs_dir": FLAGS.lake_runs_dir}, None
    if FLAGS.mnist:
        proto = protocol.mnist_protocol(run)
        proto.update({k: v for k, v in given.items() if k != "ways"})
        images = data.load_mnist(manual_dir=FLAGS.datasets)["test"].images
        result = evaluation.measure(params, config, images, protocol.episodes(proto))
        setting = {"data": "mnist/test", "ways": 10}
        return result, f"mnist_10way{proto['shots']}shot", setting, proto
    result, proto = protocol.evaluate_run(
        params, config, run, datasets=FLAGS.datasets, subset=FLAGS.subset, split=FLAGS.split,
        **given,
    )  # fmt: skip
    where = proto["split"] if proto["dataset"] == "omniglot" else proto["dataset"]
    name = f"{where}_{proto['subset']}_{proto['ways']}way{proto['shots']}shot"
    data_name = "/".join(
        [proto["dataset"]]
        + ([proto["split"]] if proto["dataset"] == "omniglot" else [])
        + [proto["subset"]]
    )
    return result, name, {"data": data_name, "ways": proto["ways"]}, proto


def _recorded(meta, run, proto, is_pretrained) -> str | None:
    """The accuracy results.json recorded for exactly this protocol (the run's test), if any."""
    if is_pretrained:
        results = records.RunResults.from_json(meta.get("results") or {})
        same = results.test_protocol == proto
    else:
        path = Path(FLAGS.workdir) / "results.json"
        results = records.RunResults.from_json(
            records.read_json(path) if path.is_file() else {}, str(path)
        )
        same = proto == protocol.protocol(run)
        same = same and results.evaluated_step == meta.get("step")
    if not same or results.test_accuracy is None:
        return None
    line = evaluation.format_accuracy(
        results.test_accuracy, results.test_ci95 or 0.0, results.test_episodes
    )
    return f"{line} in results.json (same protocol)"


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=common.parse_flags)
