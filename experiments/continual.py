r"""Continual learning: Omniglot, then permuted MNIST with new W and Q but the same Z and G.

  python -m experiments.continual --flagfile=experiments/flags/continual.flags

Writes `<workdir>/continual.json` (Omniglot accuracy every --measure_every MNIST trials) and
`<workdir>/continual.png`, one workdir per seed (`{seed}` in --workdir is the seed). An
interrupted run (SIGINT/SIGTERM, or a lost machine: checkpoints every --checkpoint_every
Omniglot steps and at each MNIST measurement) resumes when the same command runs again. See
experiments/continual_protocol.py for the protocol.
"""

from __future__ import annotations

from absl import app, flags, logging

from experiments import common, continual_protocol
from metanet_jax import runtime

FLAGS = flags.FLAGS
# Every field of the protocol's spec is a flag, with the field's default, checks and help.
continual_protocol.ContinualSpec.define_flags()


def main(argv):
    common.start_main(argv)  # before a backend starts: JAX logs its probing, XLA reads flags
    try:
        spec = continual_protocol.ContinualSpec.from_flag_values(FLAGS)
        result = continual_protocol.run(spec)
    except runtime.Interrupted as e:
        logging.warning("%s", e)
        return
    except (FileNotFoundError, ValueError) as e:  # WorkdirMismatch is a ValueError
        common.fail(str(e))
    print(
        f"Omniglot accuracy before MNIST {result['omniglot_accuracy_before']:.4f}; change while "
        f"learning MNIST: {100 * result['omniglot_change_min']:+.2f} to "
        f"{100 * result['omniglot_change_max']:+.2f} points",
        flush=True,
    )
    print(f"written: {spec.run_dir()}/continual.json, continual.png", flush=True)


if __name__ == "__main__":
    common.restart_with_huge_pages()  # malloc with huge pages: faster CPU steps
    logging.set_verbosity(logging.INFO)
    app.run(main, flags_parser=common.parse_flags)
