"""A plain (non-meta) baseline beside MetaNet's `omniglot_rows_rnn`: the same recurrent
encoder trained as a prototypical classifier on the same episodes, for a given wall time.

    python benchmarks/rows_rnn_baseline.py --seconds=1200 \
        --metanet_run=/work/runs/omniglot_rows_rnn

The encoder is the rows_lstm architecture's u without fast weights: each image read row by
row (H steps of W*C pixels) by an LSTM of `--hidden_units` (`layers.AugmentedLSTM` with
`augmented=False`: the same equations, params and initialisation), its last hidden state
through a linear layer of the same width (u's key layer). An episode's loss: the prototypes
are the class means of the support features, each query's logits the negative squared
Euclidean distances to them (Snell et al. 2017), the loss the summed query cross-entropy
(as MetaNet's); the optimiser is the MetaNet run's (clip, Adam, learning rate).

Everything else is read from the MetaNet run's flagfile (`--run_flagfile`): the data split
(held-out background alphabets for validation), training step t's episodes (the same
`fold_in(key(seed), 2)` key, rotations, ways, shots and queries per class), the fixed
validation episodes (validated every `--eval_every` steps, the best kept) and the 1,000 fixed
test episodes, identical to MetaNet's. Training stops at the first validation after
`--seconds` of wall time (training and validation, the part of MetaNet's wall time before its
test). Prints the test accuracy +- 95% CI and writes `--out` (JSON); with `--metanet_run` (the
MetaNet run's folder: its results.json and metrics.jsonl) also `--ablation` (a
docs/ablations table, both models side by side, which `python -m experiments.report
pretrained` renders in docs/RESULTS.md).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from experiments import protocol, reporting, run_data, schema  # noqa: E402
from metanet_jax import data, evaluation, runtime  # noqa: E402
from metanet_jax.model import layers  # noqa: E402

FLAGFILE = "experiments/flags/omniglot_rows_rnn.flags"


class RowsEncoder(nn.Module):
    """`[n, H, W, C] -> [n, hidden]`: the rows through a plain LSTM, then a linear layer."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        h = layers.AugmentedLSTM(self.hidden, augmented=False, name="lstm")(rows)[:, -1]
        return layers.AugmentedDense(self.hidden, linear=True, augmented=False, name="key")(h)


def prototype_logits(encoder, params, support_x, support_y, query_x, ways):
    """One episode's query logits `[L, ways]`: minus the squared distances of the query
    features to the class means of the support features."""
    feats = encoder.apply({"params": params}, jnp.concatenate([support_x, query_x]))
    sf, qf = feats[: support_x.shape[0]], feats[support_x.shape[0] :]
    onehot = jax.nn.one_hot(support_y, ways, dtype=sf.dtype)  # [N, ways]
    protos = (onehot.T @ sf) / jnp.sum(onehot, 0)[:, None]
    return -jnp.sum(jnp.square(qf[:, None, :] - protos[None]), -1)


def _batch(fn, ways):
    """`fn` over a batch of episodes (`vmap`)."""

    def run(params, support, query_x):
        one = functools.partial(fn, params, ways=ways)
        return jax.vmap(one)(support.x, support.y, query_x)

    return run


def make_fns(encoder, optimizer, ways):
    logits = _batch(functools.partial(prototype_logits, encoder), ways)

    def loss(params, support, query):
        out = logits(params, support, query.x)  # [B, L, ways]
        ce = -jnp.take_along_axis(jax.nn.log_softmax(out), query.y[..., None], -1)
        return jnp.mean(jnp.sum(ce[..., 0], -1)), out

    @jax.jit
    def step(params, opt_state, support, query):
        (value, _), grads = jax.value_and_grad(loss, has_aux=True)(params, support, query)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    @jax.jit
    def accuracy(params, support, query):
        return jnp.mean(jnp.argmax(logits(params, support, query.x), -1) == query.y, -1)

    return step, accuracy


def evaluate(accuracy, params, batches):
    accs = np.concatenate([np.asarray(accuracy(params, s, q)) for s, q in batches])
    return (*evaluation.mean_ci95(accs), len(accs))


def _value(text):
    """A flagfile value as the training program reads it: a bool, int, float, a list of
    ints ("5,10") or the text."""
    if isinstance(text, bool):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if "," in text:
        return tuple(int(v) for v in text.split(",") if v)
    return text


def run(args) -> dict:
    flags = {k: _value(v) for k, v in protocol.parse_flagfile(args.run_flagfile).items()}
    spec = protocol.run_spec(flags, datasets=args.datasets)
    splits = run_data.load_splits(spec)
    config = run_data.model_config(spec, splits["train"].shape[2:])
    hidden = config.resolved("hidden_units")
    encoder = RowsEncoder(hidden)
    params = encoder.init(jax.random.key(spec.optim.seed), jnp.zeros((1,) + config.image_shape))
    params = params["params"]
    optimizer = optax.chain(
        optax.clip_by_global_norm(config.clip_norm), optax.adam(config.learning_rate)
    )
    opt_state = optimizer.init(params)
    step_fn, accuracy = make_fns(encoder, optimizer, config.ways)
    episodes = runtime.episode_source(
        data.sample_episodes, jax.random.fold_in(jax.random.key(spec.optim.seed), 2),
        jax.device_put(splits["train"]), config, spec.optim.meta_batch, spec.step_ways,
        rotate=spec.data.rotate, rotations_as_classes=spec.data.rotations_as_classes,
    )  # fmt: skip
    ways, shots, queries = spec.test_ways(), config.shots, spec.eval_queries_per_class

    def fixed(subset, seed, n):
        return data.fixed_eval_episodes(
            seed, splits[subset], ways, shots, queries, n, min(spec.schedule.eval_batch, n)
        )

    start = time.perf_counter()
    curve, best, step, losses = [], None, 0, []
    while True:
        support, query = episodes(step)
        params, opt_state, value = step_fn(params, opt_state, support, query)
        losses.append(float(value)) if step % 100 == 0 else None
        step += 1
        if step % args.eval_every == 0:
            acc, ci, n = evaluate(accuracy, params, fixed("validation", schema.VALIDATION_SEED,
                                                          spec.schedule.eval_episodes))  # fmt: skip
            elapsed = time.perf_counter() - start
            curve.append({"step": step, "validation_accuracy": acc, "validation_ci95": ci,
                          "wall_time_s": elapsed})  # fmt: skip
            print(f"step {step}: validation {acc:.4f} +- {ci:.4f} ({n} episodes), "
                  f"{elapsed:.0f} s, loss {np.mean(losses[-10:]):.3f}", flush=True)  # fmt: skip
            if best is None or acc > best[0]:
                best = (acc, ci, step, params)
            if elapsed >= args.seconds:
                break
    train_time = time.perf_counter() - start
    test_acc, test_ci, test_n = evaluate(
        accuracy, best[3], fixed("test", schema.TEST_SEED, spec.schedule.test_episodes)
    )
    print(f"test (step {best[2]}): {evaluation.format_accuracy(test_acc, test_ci, test_n)}")
    return {
        "model": f"prototypical rows LSTM ({hidden} units, plain), same episodes as "
        f"{args.run_flagfile}",
        "run_flagfile": args.run_flagfile,
        "steps": step,
        "train_time_s": train_time,
        "wall_time_s": time.perf_counter() - start,
        "episodes_per_s": step * spec.optim.meta_batch / train_time,
        "best_validation_accuracy": best[0],
        "best_validation_ci95": best[1],
        "validation_episodes": spec.schedule.eval_episodes,
        "evaluated_step": best[2],
        "test_accuracy": test_acc,
        "test_ci95": test_ci,
        "test_episodes": test_n,
        "test_ways": ways,
        "learning_curve": curve,
        "platform": platform.platform(),
        "hardware": args.hardware,
    }


def write_ablation(args, result: dict) -> None:
    """Both models side by side (docs/ablations/<name>.json)."""
    with open(os.path.join(args.metanet_run, "results.json")) as f:
        metanet = json.load(f)
    with open(os.path.join(args.metanet_run, "metrics.jsonl")) as f:
        lines = [json.loads(line) for line in f if "validation_accuracy" in line]
    val_ci = next(r["validation_ci95"] for r in lines if r["step"] == metanet["evaluated_step"])
    rows = [
        dict(name="MetaNet, rows_lstm", flags=f"--flagfile={args.run_flagfile}",
             steps=int(metanet["steps"]), wall_time_s=float(metanet["wall_time_s"]),
             val_accuracy=float(metanet["best_validation_accuracy"]),
             val_ci95=float(val_ci), val_episodes=int(metanet["config"]["eval_episodes"]),
             test_accuracy=float(metanet["test_accuracy"]),
             test_ci95=float(metanet["test_ci95"]), test_episodes=int(metanet["test_episodes"]),
             description="augmented LSTMs for b and u, memory, m and d"),
        dict(name="prototypical baseline", flags=f"--seconds={args.seconds:g}",
             steps=result["steps"], val_episodes=result["validation_episodes"],
             wall_time_s=result["wall_time_s"], val_accuracy=result["best_validation_accuracy"],
             val_ci95=result["best_validation_ci95"], test_accuracy=result["test_accuracy"],
             test_ci95=result["test_ci95"], test_episodes=result["test_episodes"],
             description="the same rows LSTM (plain) + linear layer, nearest class mean"),
    ]  # fmt: skip
    reporting.write_ablation(
        args.ablation,
        "Sequential Omniglot: MetaNet beside a prototypical baseline (rows LSTM)",
        rows,
        description=(
            "5-way 1-shot Omniglot read row by row (28 steps of 28 pixels), standard split, "
            "the same training episodes, validation and 1,000 test episodes; the baseline "
            "trained for MetaNet's training wall time on the same machine, one after the other."
        ),
        command=" ".join(["python benchmarks/rows_rnn_baseline.py"] + sys.argv[1:]),
        hardware=args.hardware,
    )


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_flagfile", default=FLAGFILE)
    parser.add_argument("--seconds", type=float, required=True,
                        help="training wall time (training + validation)")  # fmt: skip
    parser.add_argument("--eval_every", type=int, default=5000)
    parser.add_argument("--datasets", default=None)
    parser.add_argument("--out", default="benchmarks/results/rows_rnn_baseline.json")
    parser.add_argument("--metanet_run", default=None)
    parser.add_argument("--ablation", default="docs/ablations/rows_rnn_baseline.json")
    parser.add_argument("--hardware", default="2-core CPU")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.eval_every <= 0:
        parser.error("--seconds and --eval_every must be positive")
    result = run(args)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")
    if args.metanet_run:
        write_ablation(args, result)
        print(f"wrote {args.ablation}")


if __name__ == "__main__":
    main()
