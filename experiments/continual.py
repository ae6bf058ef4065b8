r"""Continual learning: Omniglot, then permuted MNIST with new W and Q but the same Z and G.

  python -m experiments.continual --flagfile=experiments/flags/continual.flags

Writes `<workdir>/continual.json` (Omniglot accuracy every --measure_every MNIST trials) and
`<workdir>/continual.png`. See experiments/continual_protocol.py for the protocol.
"""

from __future__ import annotations

import types

from absl import app, flags, logging

from experiments import common, continual_protocol
from metanet_jax import config as config_lib
from metanet_jax.data import SPLIT_SCHEMES

FLAGS = flags.FLAGS
_D = types.SimpleNamespace(**continual_protocol.ContinualSpec(workdir="").to_dict())

flags.DEFINE_string("workdir", None, "Output folder.")
common.register_workdir_validator("workdir")  # set, and a folder this user can write
flags.DEFINE_enum("split", _D.split, SPLIT_SCHEMES, "Omniglot split scheme.")
common.define_folder("datasets", _D.datasets, "Offline data folder (default: $METANET_DATASETS).")
common.define_int("ways", _D.ways, 2, 100, "Classes per episode (both phases).")
common.define_int("shots", _D.shots, 1, 10, "Support examples per class.")
common.define_int("queries_per_class", _D.queries_per_class, 1, 19, "Queries per class.")
flags.DEFINE_enum("variant", _D.variant, config_lib.VARIANTS, "MetaNet variant.")
common.define_int("hidden_units", _D.hidden_units, 1, 4096, "MLP width of b and u.")
common.define_int("omniglot_steps", _D.omniglot_steps, 1, 10**8, "Omniglot updates.")
common.define_int("mnist_steps", _D.mnist_steps, 1, 10**8, "MNIST updates (trials).")
common.define_int("measure_every", _D.measure_every, 1, 10**8,
                  "Measure Omniglot accuracy every this many MNIST trials.")  # fmt: skip
common.define_int("permutations", _D.permutations, 1, 1000,
                  "Pixel permutations of MNIST (x10 classes).")  # fmt: skip
common.define_int("eval_episodes", _D.eval_episodes, 1, 10**6, "Episodes per measurement.")
common.define_int("eval_batch", _D.eval_batch, 1, 10**4, "Episodes per evaluation batch.")
common.define_int("meta_batch", _D.meta_batch, 1, 1024, "Tasks per update.")
common.define_float("learning_rate", _D.learning_rate, 0.0, 1.0, "Adam learning rate.")
common.define_int("seed", _D.seed, 0, common.MAX_INT, "Seed.")
common.define_int("log_every", _D.log_every, 1, 10**8, "Progress line every this many steps.")


@flags.multi_flags_validator(
    ["shots", "queries_per_class"], message="--shots + --queries_per_class must be <= 20"
)
def _per_class(v):
    return v["shots"] + v["queries_per_class"] <= 20


def main(argv):
    if len(argv) > 1:
        common.fail(f"unexpected arguments: {' '.join(argv[1:])}")
    common.quiet_libraries()
    try:
        spec = continual_protocol.ContinualSpec.from_flags({k: FLAGS[k].value for k in vars(_D)})
        result = continual_protocol.run(spec)
    except (FileNotFoundError, ValueError) as e:
        common.fail(str(e))
    print(
        f"Omniglot accuracy before MNIST {result['omniglot_accuracy_before']:.4f}; change while "
        f"learning MNIST: {100 * result['omniglot_change_min']:+.2f} to "
        f"{100 * result['omniglot_change_max']:+.2f} points",
        flush=True,
    )
    print(f"written: {spec.workdir}/continual.json, continual.png", flush=True)


if __name__ == "__main__":
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=common.parse_flags)
