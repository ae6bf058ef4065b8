r"""Write the results report: docs/RESULTS.md, README's results block, flagfile headers.

  python -m experiments.report                      # = python -m experiments.report pretrained
  python -m experiments.report pretrained workdirs  # also every run folder under workdirs/
  python -m experiments.report pretrained --check   # exit 1 if a file would change
  python -m experiments.report workdirs/continual_seed0 ... workdirs/continual_seed4

Reads every `results.json` and `eval_*.json` under the given folders (run folders and
pretrained models) and `docs/ablations/*.json`; writes one row per number of the paper's
tables with ours beside it (`experiments.reporting`). `python -m experiments.report pretrained`
regenerates the committed docs/RESULTS.md exactly. Folders holding a `continual.json` are
continual-learning runs: they are gathered into `docs/continual/` (the record and its plot,
`experiments.continual_report`), and the report's models are then the other folders given, else
`pretrained`.
"""

from __future__ import annotations

import os

from absl import app, flags, logging

from experiments import common

FLAGS = flags.FLAGS

flags.DEFINE_string("output", "docs/RESULTS.md", "The report to write.")
flags.DEFINE_string(
    "readme", "README.md", "The README whose results block is rewritten ('' to skip)."
)
flags.DEFINE_string("flags_dir", "experiments/flags",
                    "Flagfiles whose header lines are rewritten ('' to skip).")  # fmt: skip
flags.DEFINE_string("ablations_dir", "docs/ablations", "Ablation tables (*.json) to render.")
flags.DEFINE_string(
    "continual_record",
    "docs/continual/continual.json",
    "The continual-learning record: written from the continual runs given, rendered in the "
    "report ('' to skip).",
)
flags.DEFINE_bool("check", False, "Write nothing; exit 1 naming each file that would change.")


def main(argv):
    from experiments import reporting

    folders = argv[1:] or ["pretrained"]
    for folder in folders:
        if not os.path.isdir(folder):
            common.fail(f"{folder}: no such folder")
    try:
        changed = reporting.build(
            folders,
            output=FLAGS.output,
            readme=FLAGS.readme or None,
            flags_dir=FLAGS.flags_dir or None,
            ablations_dir=FLAGS.ablations_dir or None,
            continual_record=FLAGS.continual_record or None,
            check=FLAGS.check,
        )
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    if FLAGS.check:
        if changed:
            common.fail(
                "out of date (run `python -m experiments.report "
                f"{' '.join(folders)}`): {', '.join(changed)}"
            )
        print("up to date", flush=True)
        return
    for path in changed:
        print(f"written: {path}", flush=True)
    if not changed:
        print("nothing changed", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.WARNING)
    app.run(main, flags_parser=common.parse_flags)
