r"""Evaluate a trained workdir's best or latest checkpoint on any N-way K-shot setting.

  python -m experiments.evaluate --workdir=/tmp/run --ways=20            # 20-way, its split
  python -m experiments.evaluate --workdir=/tmp/run --split=previous --ways=10
  python -m experiments.evaluate --workdir=/tmp/run --lake_runs_dir=~/one-shot-runs
  python -m experiments.evaluate --workdir=/tmp/run --mnist                 # 10-way 1-shot

Prints `accuracy 0.9712 +- 0.0031 (95% CI, 1000 episodes)` over a fixed, seeded set of episodes
(Lake runs: all runs) and writes `<workdir>/eval_<name>.json`. A model can be tested on up
to its output units (`--max_ways` at training) ways.
"""

from __future__ import annotations

import json
import os

from absl import app, flags, logging

from experiments import common

if __name__ == "__main__":  # before the slow imports (JAX): a signal from now on says so
    common.handle_startup_signals(detail="nothing written")

from metanet_jax import evaluation, experiment, logging_utils  # noqa: E402

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "The trained run's folder.")
flags.register_validator(
    "workdir",
    lambda v: bool(v) and os.path.isdir(v),
    message="--workdir must name an existing run folder",
)
flags.DEFINE_enum("checkpoint", "best", ("best", "latest"), "Which checkpoint to evaluate.")
common.define_int("ways", 5, 2, 1000, "Classes per episode.")
common.define_int("shots", 1, 1, 100, "Support examples per class.")
common.define_int("queries_per_class", 10, 1, 100, "Query examples per class.")
flags.DEFINE_enum(
    "split", None, ("standard", "previous", "small1", "small2", "small"),
    "Omniglot split scheme (default: the one the run trained on).",
)  # fmt: skip
flags.DEFINE_enum("subset", "test", ("test", "validation"), "Which classes of the split.")
common.define_int("episodes", 1000, 1, 10**6, "Episodes (fixed, seeded).")
common.define_int("seed", experiment.TEST_SEED, 0, common.MAX_INT, "Seed of the episode set.")
common.define_int("batch", 50, 1, 10**4, "Episodes per evaluation batch.")
common.define_folder("lake_runs_dir", None, "Folder of Lake's one-shot runs (runNN/...).")
flags.DEFINE_bool("mnist", False, "MNIST 10-way one-shot, out of domain (--ways is ignored).")
common.define_folder("datasets", None, "Offline data folder (default: $METANET_DATASETS).")
flags.DEFINE_string("name", None, "Output name: eval_<name>.json (default: from the setting).")


@flags.multi_flags_validator(
    ["lake_runs_dir", "mnist"], message="--lake_runs_dir and --mnist are exclusive"
)
def _exclusive(v):
    return not (v["lake_runs_dir"] and v["mnist"])


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    common.quiet_libraries()
    from metanet_jax import data

    # A corrupt checkpoint is reported in one warning line and the next candidate used, as
    # in training (the workdir is only read); no good one, or a configuration this version
    # cannot read: one line, status 1.
    try:
        config, params, meta = evaluation.load_checkpoint_with_meta(FLAGS.workdir, FLAGS.checkpoint)
    except (FileNotFoundError, ValueError, evaluation.checkpointing.CheckpointError) as e:
        common.fail(str(e))
    run = meta.get("flags", {})
    step = meta.get("step")
    logging.info("evaluating %s checkpoint of step %s in %s", FLAGS.checkpoint, step, FLAGS.workdir)
    try:
        if FLAGS.lake_runs_dir:
            runs = data.load_lake_runs(os.path.expanduser(FLAGS.lake_runs_dir))
            result = evaluation.evaluate_lake_runs(params, config, runs)
            name, setting = "lake_runs", {"lake_runs_dir": FLAGS.lake_runs_dir}
        elif FLAGS.mnist:
            images = data.load_mnist(manual_dir=FLAGS.datasets)["test"].images
            result = _classes(params, config, images, 10, experiment.MNIST_SEED)
            name = f"mnist_10way{FLAGS.shots}shot"
            setting = {"data": "mnist/test", "ways": 10}
        else:
            split = FLAGS.split or run.get("split", "standard")
            if run.get("dataset", "omniglot") != "omniglot" and not FLAGS.split:
                common.fail(f"the run trained on {run.get('dataset')!r}; pass --split for Omniglot")
            parts = data.load_omniglot(
                split,
                manual_dir=FLAGS.datasets,
                validation_classes=run.get("validation_classes", 100),
                seed=run.get("split_seed", 0),
            )
            images = parts[FLAGS.subset].images
            result = _classes(params, config, images, FLAGS.ways, FLAGS.seed)
            name = f"{split}_{FLAGS.subset}_{FLAGS.ways}way{FLAGS.shots}shot"
            setting = {"data": f"omniglot/{split}/{FLAGS.subset}", "ways": FLAGS.ways}
    except (ValueError, FileNotFoundError) as e:
        common.fail(str(e))
    name = FLAGS.name or name
    out = {
        **setting,
        "shots": FLAGS.shots,
        "queries_per_class": FLAGS.queries_per_class,
        "checkpoint": FLAGS.checkpoint,
        "checkpoint_step": step,
        "episodes": result.episodes,
        "seed": FLAGS.seed,
        "accuracy": result.mean,
        "ci95": result.ci95,
        "trained": {k: run.get(k) for k in ("ways", "shots", "split", "variant", "steps")},
        "versions": logging_utils.library_versions(),
    }
    path = os.path.join(FLAGS.workdir, f"eval_{name}.json")
    logging_utils.write_json_atomic(path, out)
    print(result.line(), flush=True)
    print(f"written: {path}", flush=True)
    logging.info("%s", json.dumps({"accuracy": result.mean, "ci95": result.ci95}))


def _classes(params, config, images, ways, seed):
    return evaluation.evaluate_classes(
        params,
        config,
        images,
        ways=ways,
        shots=FLAGS.shots,
        queries_per_class=FLAGS.queries_per_class,
        episodes=FLAGS.episodes,
        seed=seed,
        batch_size=FLAGS.batch,
    )


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=common.parse_flags)
