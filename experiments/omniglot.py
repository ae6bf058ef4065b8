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

from absl import app, flags, logging

from experiments import common

if __name__ == "__main__":  # before the slow imports (JAX): a signal from now on says so
    common.restart_with_huge_pages()  # malloc with huge pages: faster CPU steps
    common.handle_startup_signals()

from experiments import run_data, schema, train, workdir  # noqa: E402
from metanet_jax import logging_utils, parallel  # noqa: E402

FLAGS = flags.FLAGS
# Every field of the run's spec is a flag, with the field's default, checks and help.
schema.RunSpec.define_flags()
common.define_distributed_flags()  # devices and processes (docs/SCALING.md)


# The checks across flags are the spec's (`RunSpec`, `MetaNetConfig`: `spec_from_flags`); this
# one reads the file system, before anything else starts.
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


def spec_from_flags() -> schema.RunSpec:
    """The `RunSpec` the parsed flags describe.

    Raises:
      ValueError: flags the spec or the model does not allow (e.g. `--max_ways` below
        `--ways`), in one line naming them.
    """
    return schema.RunSpec.from_flag_values(FLAGS)


def main(argv):
    common.start_main(argv)  # before a backend starts: JAX logs its probing, XLA reads flags
    try:
        spec = spec_from_flags()  # the flags' checks, before any backend or file
    except ValueError as e:
        common.fail(str(e))
    common.start_distributed()  # before anything starts a JAX backend
    logging.info(run_data.environment_summary())
    try:
        results = train.train_and_evaluate(spec)
    except (workdir.WorkdirMismatch, FileNotFoundError, ValueError) as e:
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
