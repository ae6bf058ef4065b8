r"""Export a trained run's best checkpoint as a pretrained model: `pretrained/<name>/`.

  python -m experiments.export_pretrained --workdir=workdirs/demo --name=demo
  python -m experiments.export_pretrained --workdir=gpu_out/previous_5way_metanet \
      --name=previous_5way_metanet --hardware="1 x NVIDIA H200"   # a folder written on a GPU

Writes `params.npz` (the parameters only, no optimiser state, no pickle), the run's
`config.json`, and `results.json` with the test accuracy measured here, now, by the same
code and protocol as `python -m experiments.evaluate --workdir=pretrained/<name>` (the run's
own test: its split, ways, shots, evaluation queries, test episodes and batch), beside the
training run's steps, wall time, hardware and its own test numbers (`training_run`). The
source is a run folder (`--checkpoint=best|latest`) or a pretrained-format folder (e.g. one
written by `benchmarks/reproduce_gpu.sh`), which is then re-measured here.

`--run_flagfile` and `--command` record how the model was trained; by default the flagfile
whose `--workdir` is the run's workdir (compared as absolute paths: `workdirs/cpu_2h` in a
flagfile and a run started with `--workdir=/abs/repo/workdirs/cpu_2h` from the repository root
match), with the flags the run changed:

  python -m experiments.export_pretrained --workdir=workdirs/cpu_2h --name=cpu_2h \
      --run_flagfile=experiments/flags/cpu_2h.flags

absl's own `--flagfile` is refused: it would read the training flagfile's flags as this
program's. Then `python -m experiments.report pretrained` rebuilds docs/RESULTS.md and
README's table.
"""

from __future__ import annotations

import functools
import os

from absl import app, flags, logging

from experiments import common
from experiments.flag_definitions import define_folder, define_run_folder

FLAGS = flags.FLAGS

# absl reads `--flagfile=<file>` itself, as this program's flags: a training flagfile's
# `--ways=...` would stop it with "Unknown command line flag" (issue 11).
REFUSED = {
    "flagfile": "this program takes the training flagfile as --run_flagfile=<path> (absl's "
    "--flagfile would read its training flags as this program's)"
}

define_run_folder("The trained run's folder, or a pretrained-format folder.")
flags.DEFINE_string("name", None, "The model's name: the folder pretrained/<name>.")
flags.register_validator(
    "name",
    lambda v: bool(v) and v[0].isalnum() and all(c.isalnum() or c in "_.-" for c in v),
    message="--name must be letters, digits, '_', '.' or '-' (starting with a letter or digit)",
)
flags.DEFINE_string("pretrained_dir", "pretrained", "Folder of the pretrained models.")
flags.DEFINE_enum("checkpoint", "best", ("best", "latest"), "Which checkpoint (run folders).")
flags.DEFINE_string("hardware", None,
                    "What the model trained on, e.g. '2-core CPU (AMD EPYC)' or '1 x NVIDIA "
                    "H200' (default: what the run recorded).")  # fmt: skip
flags.DEFINE_string("run_flagfile", None,
                    "The flagfile it was trained with (default: the one in experiments/flags "
                    "whose --workdir is the run's).")  # fmt: skip
flags.DEFINE_string("command", None, "The training command (default: from the flagfile).")
define_folder("datasets", None, "Offline data folder (default: $METANET_DATASETS).")
flags.DEFINE_bool("overwrite", False, "Replace an existing pretrained/<name>.")


def main(argv):
    common.start_main(argv)  # before a backend starts: JAX logs its probing, XLA reads flags
    from experiments import exporting, protocol
    from metanet_jax import evaluation, pretrained

    dest = os.path.join(FLAGS.pretrained_dir, FLAGS.name)
    if os.path.exists(dest) and not FLAGS.overwrite:
        common.fail(f"{dest} exists; pass --overwrite to replace it")
    if FLAGS.run_flagfile and not os.path.isfile(FLAGS.run_flagfile):
        common.fail(f"--run_flagfile={FLAGS.run_flagfile}: no such file")
    try:
        _, _, meta = pretrained.load(FLAGS.workdir, FLAGS.checkpoint)
        run = meta.get("flags") or {}
        recorded = (meta.get("results") or {}) if pretrained.is_pretrained(FLAGS.workdir) else {}
        flagfile = FLAGS.run_flagfile or recorded.get("flagfile") or protocol.find_flagfile(run)
        info = {"flagfile": None if flagfile is None else str(flagfile).replace(os.sep, "/")}
        info["command"] = (
            FLAGS.command or recorded.get("command") or protocol.training_command(run, flagfile)
        )
        if FLAGS.hardware:
            info["hardware"] = FLAGS.hardware
        logging.info("exporting %s (%s) to %s; measuring its test accuracy here", FLAGS.workdir,
                     FLAGS.checkpoint, dest)  # fmt: skip
        results = exporting.export(
            FLAGS.workdir, dest, which=FLAGS.checkpoint, datasets=FLAGS.datasets, info=info,
            overwrite=FLAGS.overwrite,
        )  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        common.fail(str(e))
    except evaluation.checkpointing.CheckpointError as e:
        common.fail(str(e))
    print(
        evaluation.format_accuracy(
            results["test_accuracy"], results["test_ci95"], results["test_episodes"]
        ),
        flush=True,
    )
    size = pretrained.folder_size(dest)
    total = pretrained.folder_size(FLAGS.pretrained_dir)
    print(f"written: {dest} ({size / 1e6:.2f} MB; {FLAGS.pretrained_dir}/ holds "
          f"{total / 1e6:.2f} MB)", flush=True)  # fmt: skip
    if size > pretrained.MAX_MODEL_BYTES:
        logging.warning("%s holds %.2f MB, above the %.0f MB the repository allows a model "
                        "(keep it outside pretrained/)", dest, size / 1e6,
                        pretrained.MAX_MODEL_BYTES / 1e6)  # fmt: skip
    if total > pretrained.MAX_TOTAL_BYTES:
        limit = pretrained.MAX_TOTAL_BYTES / 1e6
        logging.warning("%s/ holds %.2f MB, above the %.0f MB the repository allows",
                        FLAGS.pretrained_dir, total / 1e6, limit)  # fmt: skip


if __name__ == "__main__":
    common.restart_with_huge_pages()  # malloc with huge pages: faster CPU steps
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=functools.partial(common.parse_flags, refused=REFUSED))
