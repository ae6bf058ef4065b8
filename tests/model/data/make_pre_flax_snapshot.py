"""Writes `pre_flax_snapshot.npz`: params, episodes, logits and losses of the built-in networks
as the code before the Flax-module redesign computed them (run once, at commit 80b1e91).

Running it again after the redesign would only compare the new code with itself: the file is
the independent record. `tests/model/test_snapshot.py` loads every case's params into today's
code and checks the logits and losses.

    PYTHONPATH=. python tests/model/data/make_pre_flax_snapshot.py
"""

import json
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import metanet_jax as mn  # noqa: E402

TINY = dict(
    ways=3, shots=1, queries_per_class=2, image_shape=(6, 6, 1), conv_channels=3,
    num_conv_layers=2, hidden_units=5, rep_chunks=2, lstm_hidden=4, generator_hidden=4,
)  # fmt: skip

CASES = {
    "omniglot_metanet": dict(max_ways=5),
    "omniglot_metanet_minus_2shot": dict(variant="metanet-", shots=2, query_path="stacked"),
    "omniglot_metanet_plus": dict(variant="metanet+", augment_base=("conv_1", "fc_0", "out")),
    "omniglot_base_input_r": dict(base_input="r"),
    "mini_imagenet_authors": dict(
        architecture="mini_imagenet_cnn", image_shape=(8, 8, 3), batchnorm_layers=1,
        variant="metanet+",
    ),
    "mini_imagenet_per_pass": dict(
        architecture="mini_imagenet_cnn", image_shape=(8, 8, 3), batchnorm_layers=1,
        bn_statistics="per_pass",
    ),
    "mlp": dict(architecture="mlp", image_shape=(6, 6, 1), hidden_units=6),
}  # fmt: skip


def flat(tree, prefix):
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        out[f"{prefix}/params/{name}"] = np.asarray(leaf)
    return out


def main():
    arrays, configs = {}, {}
    for i, (case, overrides) in enumerate(CASES.items()):
        kwargs = {**TINY, **overrides}
        config = mn.MetaNetConfig(**kwargs)
        params = mn.init(jax.random.key(10 + i), config)
        support, query = mn.synthetic.synthetic_episodes(jax.random.key(20 + i), config, 2)
        loss, aux = mn.episode_loss(params, support, query, config)
        arrays.update(flat(params, case))
        arrays[f"{case}/support_x"] = np.asarray(support.x)
        arrays[f"{case}/support_y"] = np.asarray(support.y)
        arrays[f"{case}/query_x"] = np.asarray(query.x)
        arrays[f"{case}/query_y"] = np.asarray(query.y)
        arrays[f"{case}/logits"] = np.asarray(aux["logits"])
        arrays[f"{case}/task_loss"] = np.asarray(aux["task_loss"])
        arrays[f"{case}/loss"] = np.asarray(loss)
        configs[case] = {k: list(v) if isinstance(v, tuple) else v for k, v in kwargs.items()}
    arrays["configs"] = np.asarray(json.dumps(configs, sort_keys=True))
    out = os.path.join(os.path.dirname(__file__), "pre_flax_snapshot.npz")
    np.savez_compressed(out, **arrays)
    print(f"wrote {out}: {len(arrays)} arrays, {os.path.getsize(out)} bytes")


if __name__ == "__main__":
    main()
