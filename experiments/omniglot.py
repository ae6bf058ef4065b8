r"""Train a Meta Network on Omniglot (or Mini-ImageNet / synthetic data), then test it.

  python -m experiments.omniglot --flagfile=experiments/flags/demo.flags
  python -m experiments.omniglot --flagfile=experiments/flags/standard_5way.flags \
      --workdir=/tmp/run1 --steps=20000

Every flag is validated before any work: a bad value exits with status 1 and one line naming
the flag and its allowed range, and nothing (not even the workdir) is created. A run on an
existing workdir resumes from its latest checkpoint (`--steps` is the total to reach); one
whose model or data flags differ from the workdir's config.json is refused. SIGINT/SIGTERM
during training save a checkpoint and exit (status 0), during the final test stop it (status
0; rerun to test), before training starts exit at once (status 130/143), each with one line; a
NaN/infinite loss stops the run (status 1) keeping the last good checkpoint; a corrupt
checkpoint is set aside and the previous good one used (metanet_jax/checkpointing.py). The
run itself is `experiments.train.train_and_evaluate`; see WORKSPACE.md.

The same command runs on one CPU, on every device of a host (the meta-batch is split over
them) and on several hosts (`--coordinator_address`, `--num_processes`, `--process_id`, or a
cluster manager JAX detects); see docs/SCALING.md.
"""

from __future__ import annotations

import sys
import types

from absl import app, flags, logging

from experiments import common

if __name__ == "__main__":  # before the slow imports (JAX): a signal from now on says so
    common.handle_startup_signals()

from experiments import train  # noqa: E402
from metanet_jax import config as config_lib  # noqa: E402
from metanet_jax import logging_utils, parallel  # noqa: E402
from metanet_jax.data import SPLIT_SCHEMES  # noqa: E402

FLAGS = flags.FLAGS
_D = types.SimpleNamespace(**train.RunSpec(workdir="").to_dict())  # the flags' defaults

# --- where
flags.DEFINE_string("workdir", None, "Run folder (config.json, checkpoints, metrics, results).")
common.register_workdir_validator("workdir")  # set, and a folder this user can write
flags.DEFINE_enum("dataset", _D.dataset, train.DATASETS, "Data set.")
flags.DEFINE_enum("split", _D.split, SPLIT_SCHEMES, "Omniglot class split scheme (docs/DATA.md).")
common.define_int("validation_classes", _D.validation_classes, 1, 500,
                  "Omniglot background characters held out for validation.")  # fmt: skip
common.define_int("validation_alphabets", _D.validation_alphabets, 0, 29,
                  "Hold out this many whole background alphabets for validation instead of "
                  "--validation_classes characters (standard and small splits; 0: off)."
                  )  # fmt: skip
common.define_int("split_seed", _D.split_seed, 0, common.MAX_INT, "Seed of the class split.")
common.define_folder("datasets", _D.datasets,
                     "Offline data folder holding omniglot/ and mnist/ (default: "
                     "$METANET_DATASETS, else TFDS downloads).")  # fmt: skip
common.define_folder("mini_imagenet_dir", _D.mini_imagenet_dir,
                     "Mini-ImageNet folder (CSV splits + images), --dataset=mini_imagenet only.",
                     must_exist=False)  # fmt: skip
common.define_int("synthetic_size", _D.synthetic_size, 4, 128,
                  "Image size of --dataset=synthetic (smoke tests).")  # fmt: skip
# --- episodes
common.define_int("ways", _D.ways, 2, 1000, "Classes per episode (N-way).")
common.define_int("shots", _D.shots, 1, 100, "Support examples per class (K-shot).")
common.define_int("queries_per_class", _D.queries_per_class, 1, 100,
                  "Training query examples per class.")  # fmt: skip
common.define_int("eval_queries_per_class", _D.eval_queries_per_class, 1, 100,
                  "Query examples per class in validation and test episodes.")  # fmt: skip
common.define_int("max_ways", _D.max_ways, 2, 1000,
                  "Output units of b (>= ways), to test on more ways than trained.",
                  allow_none=True)  # fmt: skip
common.define_int("eval_ways", _D.eval_ways, 2, 1000,
                  "Classes per validation and test episode (unset: --ways); at most --max_ways "
                  "(else --ways): they use b's first eval_ways output units.",
                  allow_none=True)  # fmt: skip
flags.DEFINE_bool("rotate", _D.rotate, "Rotate each training class by k*90 degrees.")
flags.DEFINE_bool("rotations_as_classes", _D.rotations_as_classes,
                  "The 4 rotations of a training class are 4 classes.")  # fmt: skip
# --- optimisation
common.define_int("meta_batch", _D.meta_batch, 1, 1024, "Tasks (episodes) per update.")
common.define_int("steps", _D.steps, 1, 10**8, "Total updates to reach (resume included).")
common.define_float("learning_rate", _D.learning_rate, 0.0, 1.0, "Adam learning rate.")
common.define_float("clip_norm", _D.clip_norm, 0.0, 1e6, "Global-norm gradient clipping.")
flags.DEFINE_enum("lr_schedule", _D.lr_schedule, config_lib.LR_SCHEDULES,
                  "Learning rate: constant (the authors') or cosine decay to 0 at "
                  "--schedule_steps, both after --warmup_steps of linear warm-up.")  # fmt: skip
common.define_int("warmup_steps", _D.warmup_steps, 0, 10**8, "Linear learning-rate warm-up.")
common.define_int("schedule_steps", _D.schedule_steps, 0, 10**8,
                  "Length of the cosine schedule (recorded; independent of --steps, so a "
                  "finished run can be continued without changing its past schedule).")  # fmt: skip
flags.DEFINE_enum("generator_init", _D.generator_init, config_lib.GENERATOR_INITS,
                  "Initialisation of m and d: authors (Chainer v1 defaults, as the authors' "
                  "code) or small (fast weights start as a small perturbation).")  # fmt: skip
flags.DEFINE_enum("network_init", _D.network_init, config_lib.NETWORK_INITS,
                  "Initialisation of b and u: authors (N(0, 1/fan_in), Chainer v1) or he."
                  )  # fmt: skip
flags.DEFINE_enum("label_units", _D.label_units, config_lib.LABEL_UNITS,
                  "Training labels: first (0..ways-1, the first --ways output units) or any "
                  "(a random --ways of the --max_ways units per episode: all are trained)."
                  )  # fmt: skip
common.define_int("seed", _D.seed, 0, common.MAX_INT, "Seed of init, training episodes, keys.")
# --- model
flags.DEFINE_enum("variant", _D.variant, config_lib.VARIANTS, "MetaNet variant.")
flags.DEFINE_enum("base_input", _D.base_input, config_lib.BASE_INPUTS,
                  "Input of the base learner: x (image) or r (representation).")  # fmt: skip
flags.DEFINE_enum("architecture", _D.architecture, config_lib.ARCHITECTURES, "Networks b and u.")
common.define_int("conv_channels", _D.conv_channels, 1, 1024,
                  "Conv channels (unset: architecture default).", allow_none=True)  # fmt: skip
common.define_int("num_conv_layers", _D.num_conv_layers, 1, 8,
                  "Conv blocks (unset: architecture default).", allow_none=True)  # fmt: skip
common.define_int("hidden_units", _D.hidden_units, 1, 4096,
                  "FC width (unset: architecture default).", allow_none=True)  # fmt: skip
common.define_int("rep_chunks", _D.rep_chunks, 1, 100, "T: support chunks for d.")
flags.DEFINE_bool("second_order", _D.second_order, "Differentiate through meta information.")
flags.DEFINE_bool("rep_loss_in_objective", _D.rep_loss_in_objective,
                  "Add the representation loss to the training objective.")  # fmt: skip
flags.DEFINE_enum("task_batching", _D.task_batching, config_lib.TASK_BATCHING,
                  "Tasks of a meta-batch: auto (loop on CPU, vmap on accelerators), loop (a "
                  "host loop over one per-task program) or vmap.")  # fmt: skip
flags.DEFINE_enum("query_path", _D.query_path, config_lib.QUERY_PATHS,
                  "How queries read their own fast weights: auto (patches on CPU, stacked on "
                  "accelerators), stacked or patches (README).")  # fmt: skip
flags.DEFINE_enum("compute_dtype", _D.compute_dtype, config_lib.COMPUTE_DTYPES,
                  "Activation dtype.")  # fmt: skip
flags.DEFINE_enum("bn_statistics", _D.bn_statistics, config_lib.BN_STATISTICS,
                  "BatchNorm statistics (Mini-ImageNet network): authors (the whole support "
                  "set for the meta-gradients, support set and queries apart for the keys) or "
                  "per_pass (the examples of each pass: what runs made before this flag "
                  "used); see MetaNetConfig.bn_statistics.")  # fmt: skip
# --- evaluation, checkpoints, logging
common.define_int("eval_every", _D.eval_every, 1, 10**8, "Validate every this many steps.")
common.define_int("eval_episodes", _D.eval_episodes, 1, 10**6, "Validation episodes.")
common.define_int("test_episodes", _D.test_episodes, 1, 10**6, "Final test episodes.")
common.define_int("mnist_test_episodes", _D.mnist_test_episodes, 0, 10**6,
                  "Also test MNIST 10-way 1-shot out of domain (0: off).")  # fmt: skip
common.define_int("eval_batch", _D.eval_batch, 1, 10**4, "Episodes per evaluation batch.")
common.define_int("checkpoint_every", _D.checkpoint_every, 1, 10**8,
                  "Checkpoint every this many steps (and after each validation).")  # fmt: skip
common.define_int("keep_checkpoints", _D.keep_checkpoints, 1, 1000,
                  "Latest checkpoints kept (the best one is kept as well).")  # fmt: skip
common.define_int("log_every", _D.log_every, 1, 10**8, "Progress line every this many steps.")
# --- devices and processes (docs/SCALING.md)
common.define_distributed_flags()


@flags.multi_flags_validator(["ways", "max_ways"], message="--max_ways must be unset or >= --ways")
def _max_ways(v):
    return v["max_ways"] is None or v["max_ways"] >= v["ways"]


@flags.multi_flags_validator(
    ["lr_schedule", "warmup_steps", "schedule_steps"],
    message="--lr_schedule=cosine needs --schedule_steps > --warmup_steps",
)
def _schedule(v):
    return v["lr_schedule"] != "cosine" or v["schedule_steps"] > v["warmup_steps"]


@flags.multi_flags_validator(
    ["split", "validation_alphabets", "dataset"],
    message="--validation_alphabets needs an Omniglot split whose test set is whole alphabets "
    "(standard, small1, small2, small); the previous split mixes alphabets",
)
def _validation_alphabets(v):
    return v["validation_alphabets"] == 0 or v["dataset"] != "omniglot" or v["split"] != "previous"


@flags.multi_flags_validator(
    ["ways", "max_ways", "eval_ways"],
    message="--eval_ways must be unset or <= --max_ways (else --ways): the output units of b",
)
def _eval_ways(v):
    units = v["ways"] if v["max_ways"] is None else v["max_ways"]
    return v["eval_ways"] is None or v["eval_ways"] <= units


@flags.multi_flags_validator(
    ["dataset", "shots", "queries_per_class", "eval_queries_per_class"],
    message="--shots + --queries_per_class (and + --eval_queries_per_class) must be <= 20, "
    "the drawings per Omniglot character",
)
def _per_class(v):
    need = v["shots"] + max(v["queries_per_class"], v["eval_queries_per_class"])
    return v["dataset"] == "mini_imagenet" or need <= 20


@flags.multi_flags_validator(
    ["dataset", "mini_imagenet_dir"],
    message="--dataset=mini_imagenet needs --mini_imagenet_dir naming an existing folder "
    "(the data is not distributed with this project; see docs/DATA.md)",
)
def _mini_imagenet(v):
    import os

    if v["dataset"] != "mini_imagenet":
        return True
    return bool(v["mini_imagenet_dir"]) and os.path.isdir(v["mini_imagenet_dir"])


@flags.multi_flags_validator(
    ["dataset", "architecture"],
    message="--dataset=mini_imagenet needs --architecture=mini_imagenet_cnn and the other "
    "data sets omniglot_cnn or mlp",
)
def _architecture(v):
    return (v["dataset"] == "mini_imagenet") == (v["architecture"] == "mini_imagenet_cnn")


def spec_from_flags() -> train.RunSpec:
    """The `RunSpec` the parsed flags describe.

    Raises:
      ValueError: a model the flags do not allow (e.g. `--learning_rate=0`).
    """
    return train.RunSpec.from_flags({name: FLAGS[name].value for name in vars(_D)})


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    common.start_distributed()  # first: before anything starts a JAX backend
    common.quiet_libraries()
    logging.info(train.environment_summary())
    try:
        spec = spec_from_flags()
        results = train.train_and_evaluate(spec)
    except (train.WorkdirMismatch, FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    except train.checkpointing.CheckpointError as e:
        common.fail(str(e))
    if results["status"] == "nan":
        sys.exit(1)
    if results["status"] == "completed" and parallel.is_primary():
        print(logging_utils.final_table(results), flush=True)
        print(f"results: {spec.workdir}/results.md", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=common.parse_flags)
