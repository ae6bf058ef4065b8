"""BatchNorm statistics (`MetaNetConfig.bn_statistics`): which examples each pass normalises over.

The authors' MetaNetPartial.py (METANET.md, audit): b's per-example meta-gradients and u's
representation-loss chunks use the statistics of the whole support set; u's keys normalise the
support set and the queries separately; b's queries use the query set's. "per_pass" is the
behaviour before the field existed: each example, chunk or key pass by itself.

Checked three ways: against the float64 loop reference (`tests/reference.py`, both modes, with
BatchNorm before and inside the augmented layers), against numpy by hand on a one-conv network,
and for saved configurations that lack the field (they mean "per_pass").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax import checkpointing, evaluation
from metanet_jax.model import episode as ep
from tests.conftest import tiny_batch, tiny_config
from tests.model import reference


def _jit(fn, **kwargs):
    """`jax.jit` at the suite's level (tests/conftest.py: XLA backend optimisation level 0).
    The max-pool written as a max over a reshape had wrong gradients through conv ->
    BatchNorm -> ReLU -> pool under jit at every level (10-100% at level 0, 40-90% at level 1,
    about 1% at the default); `layers.max_pool`, maxima of the four strided sub-grids, is
    exact at all of them (tests/test_layers.py)."""
    return jax.jit(fn, **kwargs)


def _to64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, tree)


def _random_bn(params, seed):
    """Scale and offset away from (1, 0), so that a test sees both applied."""
    rng = np.random.default_rng(seed)
    for net in ("base", "representation"):
        for name, layer in params[net].items():
            if name.startswith("bn_"):
                c = layer["scale"].shape[0]
                layer["scale"] = jnp.asarray(rng.uniform(0.5, 1.5, c), layer["scale"].dtype)
                layer["offset"] = jnp.asarray(rng.uniform(-0.3, 0.3, c), layer["offset"].dtype)
    return params


# ----------------------------------------------------------------------------- loop reference
@pytest.mark.parametrize(
    "bn_statistics, batchnorm_layers, variant, query_path",
    [
        # BatchNorm only before the augmented layers (the Mini-ImageNet layout: conv_0 here):
        # the library runs the layers before them once and each example or chunk on its rows.
        ("authors", 1, "metanet+", "patches"),
        # BatchNorm inside an augmented layer too (conv_1): every example or chunk runs the
        # whole support set through the augmented layers.
        ("authors", 2, "metanet", "stacked"),
        ("per_pass", 2, "metanet+", "stacked"),
    ],
)
def test_matches_loop_reference_float64(x64, bn_statistics, batchnorm_layers, variant, query_path):
    # 4-way 1-shot, T = 2: equal chunks of two support examples (module docstring of reference).
    config = tiny_config(
        architecture="mini_imagenet_cnn", image_shape=(8, 8, 3), num_conv_layers=3,
        batchnorm_layers=batchnorm_layers, ways=4, queries_per_class=1, rep_chunks=2,
        variant=variant, query_path=query_path, bn_statistics=bn_statistics,
        compute_dtype="float64",
    )  # fmt: skip
    assert "conv_0" not in mn.networks.augmented_names(config, "base")
    assert "conv_1" in mn.networks.augmented_names(config, "base")
    params = _random_bn(_to64(mn.init(jax.random.key(0), config)), seed=1)
    support, query = tiny_batch(config, batch=1)
    support = mn.Episode(support.x.astype(jnp.float64), support.y)
    query = mn.Episode(query.x.astype(jnp.float64), query.y)
    fn = _jit(lambda p, s, q, c: mn.episode_loss(p, s, q, c), static_argnums=3)
    loss, aux = fn(params, support, query, config)
    ref_loss, ref_logits, ref_att = reference.episode(params, config, support, query)
    assert reference.relative_error(aux["logits"], ref_logits) < 1e-10
    assert reference.relative_error(aux["attention"], ref_att) < 1e-10
    assert reference.relative_error(loss, ref_loss) < 1e-10


# ----------------------------------------------------------------------------- by hand (numpy)
# One conv (3x3, 2 channels, BatchNorm) on 2x2 grey images, a 2x2 max-pool to 1x1, then b:
# fc_0 (3 units, ReLU) and out (3 units); u: the key (3 units, linear) and the head.
HAND = dict(
    architecture="mini_imagenet_cnn", image_shape=(2, 2, 1), num_conv_layers=1,
    batchnorm_layers=1, conv_channels=2, hidden_units=3, ways=3, shots=1, queries_per_class=1,
    rep_chunks=3, variant="metanet-", compute_dtype="float64",
)  # fmt: skip


def _np_conv(x, k):
    """'SAME' 3x3 convolution written out: x [n, H, W, C], k [3, 3, C, F]."""
    n, height, width, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    out = np.zeros((n, height, width, k.shape[-1]))
    for i in range(height):
        for j in range(width):
            out[:, i, j] = np.einsum("nabc,abcf->nf", padded[:, i : i + 3, j : j + 3], k)
    return out


def _np_trunk(net, x):
    """conv -> BatchNorm over all of x -> ReLU -> 2x2 max-pool: [n, 2, 2, 1] -> [n, 2]."""
    h = _np_conv(x, np.asarray(net["conv_0"]["kernel"]))
    mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    bn = net["bn_conv_0"]
    h = (h - mean) / np.sqrt(var + 1e-5) * np.asarray(bn["scale"]) + np.asarray(bn["offset"])
    return np.maximum(h, 0).max(axis=(1, 2))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _hand_setup(seed=0, **overrides):
    config = tiny_config(**{**HAND, **overrides})
    params = _random_bn(_to64(mn.init(jax.random.key(seed), config)), seed=seed + 1)
    rng = np.random.default_rng(seed)
    xs, xq = rng.normal(size=(3, 2, 2, 1)), rng.normal(size=(3, 2, 2, 1))
    return config, params, xs, np.array([2, 0, 1]), xq


def _np_out_gradient(base, x, i, y):
    """d CE(b(x)[i], y) / d out-kernel, with the statistics of all of x: the softmax error
    times fc_0's output, out = relu(trunk @ fc_0) @ out."""
    h = np.maximum(_np_trunk(base, x) @ np.asarray(base["fc_0"]["kernel"]), 0)
    p = _softmax(h @ np.asarray(base["out"]["kernel"]))[i]
    return np.outer(h[i], p - np.eye(3)[y])


@pytest.mark.parametrize("augment_base", [None, ("fc_0", "out")])
def test_per_example_meta_gradients_use_the_statistics_the_protocol_names(x64, augment_base):
    # None: conv_0 (with BatchNorm) is augmented; ("fc_0", "out"): BatchNorm only before them.
    for mode in ("authors", "per_pass"):
        config, params, xs, ys, _ = _hand_setup(augment_base=augment_base, bn_statistics=mode)
        base = params["base"]
        grads = _jit(lambda b, x, c=config: mn.base_meta_info(b, x, jnp.asarray(ys), c))
        got = np.asarray(grads(base, xs)["out"]["kernel"])
        for i in range(3):
            stats = xs if mode == "authors" else xs[i : i + 1]  # whole support set / example i
            row = i if mode == "authors" else 0
            want = _np_out_gradient(base, stats, row, ys[i])
            np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-14)
        # Changing support example 2 changes example 0's gradient only through the statistics.
        moved = xs.copy()
        moved[2] += 1.5
        again = np.asarray(grads(base, moved)["out"]["kernel"])
        if mode == "authors":
            assert np.abs(again[0] - got[0]).max() > 1e-3
        else:  # instance normalisation: example 0's pass never sees example 2
            np.testing.assert_array_equal(again[0], got[0])


def test_representation_chunks_use_the_statistics_the_protocol_names(x64):
    # T = N = 3: chunks of one example, each chunk's mean CE through u's head.
    for mode in ("authors", "per_pass"):
        config, params, xs, ys, _ = _hand_setup(bn_statistics=mode)
        rep = params["representation"]
        _, losses = _jit(
            lambda q, x, c=config: mn.representation_meta_info(q, mn.Episode(x, jnp.asarray(ys)), c)
        )(rep, xs)
        for i in range(3):
            stats = xs if mode == "authors" else xs[i : i + 1]
            key = _np_trunk(rep, stats) @ np.asarray(rep["key"]["kernel"])
            logits = np.maximum(key, 0) @ np.asarray(rep["head"]["kernel"])
            row = i if mode == "authors" else 0
            want = -np.log(_softmax(logits)[row, ys[i]])
            np.testing.assert_allclose(np.asarray(losses)[i], want, rtol=1e-10)


def test_keys_normalise_support_and_queries_separately_or_together(x64):
    # MetaNet- (no task-level fast weights): the keys are u(Q, x), so the attention of the
    # queries over the support set follows from the trunk, the key layer and the statistics.
    for mode in ("authors", "per_pass"):
        config, params, xs, ys, xq = _hand_setup(bn_statistics=mode)
        rep = params["representation"]
        _, aux = _jit(lambda p, s, q, c=config: ep.task_forward(p, s, q, c))(
            params, mn.Episode(xs, jnp.asarray(ys)), xq
        )
        key = np.asarray(rep["key"]["kernel"])
        if mode == "authors":
            r_support, r_query = _np_trunk(rep, xs) @ key, _np_trunk(rep, xq) @ key
        else:
            both = _np_trunk(rep, np.concatenate([xs, xq])) @ key
            r_support, r_query = both[:3], both[3:]
        dots = r_query @ r_support.T
        norms = np.outer((r_query**2).sum(-1), (r_support**2).sum(-1))
        want = _softmax(dots / np.sqrt(norms + 1e-6))
        np.testing.assert_allclose(np.asarray(aux["attention"]), want, rtol=1e-10)


# ----------------------------------------------------------------------------- saved configs
def test_a_saved_config_without_the_field_means_per_pass():
    config = tiny_config(architecture="mini_imagenet_cnn", image_shape=(8, 8, 3))
    assert config.bn_statistics == "authors"  # the default of new configurations
    saved = checkpointing.config_to_dict(config)
    assert checkpointing.config_from_dict(saved) == config
    del saved["bn_statistics"]
    assert checkpointing.config_from_dict(saved).bn_statistics == "per_pass"
    with pytest.raises(ValueError, match="bn_statistics"):
        config.replace(bn_statistics="pooled")


def test_a_checkpoint_saved_without_the_field_loads_as_per_pass(tmp_path):
    config = tiny_config(
        architecture="mini_imagenet_cnn", image_shape=(8, 8, 3), bn_statistics="per_pass"
    )
    meta = {"model_config": checkpointing.config_to_dict(config)}
    del meta["model_config"]["bn_statistics"]  # as written before the field existed
    state = evaluation.fresh_state(config)
    with checkpointing.Checkpointer(evaluation.checkpoint_dir(tmp_path), keep=2) as ckpt:
        ckpt.save(state, meta)
    loaded, params = evaluation.load_checkpoint(tmp_path, "latest")
    # per_pass, the statistics it was trained with (the hand-computed tests above show that
    # the two settings give different numbers).
    assert loaded == config
    assert jax.tree.all(jax.tree.map(np.array_equal, params, state.params))
