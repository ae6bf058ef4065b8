"""The whole episode: shapes, the loop-based reference, gradients, variants, bad input."""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax.model import episode as ep
from metanet_jax.model import networks
from tests.conftest import episode_loss_fn, tiny_batch, tiny_config
from tests.model import oracle, reference


def _to64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, tree)


@pytest.mark.parametrize("variant", ["metanet", "metanet-", "metanet+"])
@pytest.mark.parametrize("query_path", ["stacked", "patches"])
def test_matches_loop_reference_float64(x64, variant, query_path):
    config = tiny_config(
        variant=variant, query_path=query_path, compute_dtype="float64", queries_per_class=1
    )
    params = _to64(mn.init(jax.random.key(0), config))
    support, query = tiny_batch(config, batch=1)
    support = mn.Episode(support.x.astype(jnp.float64), support.y)
    query = mn.Episode(query.x.astype(jnp.float64), query.y)
    loss, aux = jax.jit(lambda p, s, q: mn.episode_loss(p, s, q, config))(params, support, query)
    ref_loss, ref_logits, ref_att = reference.episode(params, config, support, query)
    assert aux["logits"].dtype == jnp.float64
    assert reference.relative_error(aux["logits"], ref_logits) < 1e-10
    assert reference.relative_error(aux["attention"], ref_att) < 1e-10
    assert reference.relative_error(loss, ref_loss) < 1e-10


def test_output_shapes_and_fast_weight_structure():
    config = tiny_config(queries_per_class=3)
    params = mn.init(jax.random.key(0), config)
    assert set(params) == {"base", "representation", "example_generator", "task_generator"}
    support, query = tiny_batch(config, batch=4)
    loss, aux = episode_loss_fn(config)(params, support, query)
    b, n, length = 4, config.support_size, config.query_size
    chex.assert_shape(loss, ())
    chex.assert_shape(aux["logits"], (b, length, config.ways))
    chex.assert_shape(aux["accuracy"], (b,))
    chex.assert_shape(aux["attention"], (b, length, n))
    np.testing.assert_allclose(np.asarray(aux["attention"]).sum(-1), 1.0, rtol=1e-5)
    chex.assert_tree_all_finite((loss, aux))

    # Fast weights mirror the augmented slow subtrees (shapes only: traced, not run).
    b, u = networks.learners(config)
    task = mn.Episode(support.x[0], support.y[0])
    rep_meta = functools.partial(mn.representation_meta_info, config=config)
    grads_u, losses = jax.eval_shape(rep_meta, params["representation"], task)
    chex.assert_shape(losses, (min(config.rep_chunks, n),))
    rep_gen = params["task_generator"]["representation"]
    q_star = jax.eval_shape(mn.task_fast_weights, rep_gen, grads_u)
    chex.assert_trees_all_equal_shapes(q_star, u.subtree(params["representation"]))
    base_meta = functools.partial(mn.base_meta_info, config=config)
    grads_b = jax.eval_shape(base_meta, params["base"], task.x, task.y)
    values = jax.eval_shape(mn.example_fast_weights, params["example_generator"], grads_b)
    w_aug = b.subtree(params["base"])
    assert list(w_aug) == list(networks.augmented_names(config, "base"))
    chex.assert_trees_all_equal_shapes(
        values, jax.tree.map(lambda w: jnp.zeros((n,) + w.shape), w_aug)
    )
    predict = mn.make_predict(config)
    logits = predict(params, support, query.x)
    np.testing.assert_allclose(logits, aux["logits"], rtol=1e-5, atol=1e-5)


def test_query_paths_agree_float32():
    config = tiny_config(ways=4, queries_per_class=3)
    params = mn.init(jax.random.key(1), config)
    support, query = tiny_batch(config, batch=2, seed=3)
    outs = {}
    for path in ("stacked", "patches"):
        c = config.replace(query_path=path)
        outs[path] = jax.jit(
            jax.value_and_grad(lambda p: mn.episode_loss(p, support, query, c)[0])
        )(params)
    np.testing.assert_allclose(outs["stacked"][0], outs["patches"][0], rtol=1e-5)
    chex.assert_trees_all_close(outs["stacked"][1], outs["patches"][1], rtol=2e-3, atol=1e-5)


@pytest.mark.parametrize("architecture", ["omniglot_cnn", "mini_imagenet_cnn"])
def test_builtin_query_paths_agree_with_the_per_query_oracle(x64, architecture):
    # Mini-ImageNet: BatchNorm inside an augmented layer (conv_1) and before them (conv_0).
    config = tiny_config(
        architecture=architecture, image_shape=(7, 7, 3), num_conv_layers=3,
        batchnorm_layers=2 if architecture == "mini_imagenet_cnn" else None,
        variant="metanet+", compute_dtype="float64",
    )  # fmt: skip
    params = _to64(mn.init(jax.random.key(0), config))
    b, _ = networks.learners(config)
    n, length = 3, 5
    ks = iter(jax.random.split(jax.random.key(1), 32))
    values = jax.tree.map(lambda s: jax.random.normal(next(ks), (n,) + s.shape), b.augmented)
    task = jax.tree.map(lambda s: 0.3 * jax.random.normal(next(ks), s.shape), b.augmented)
    attention = jax.nn.softmax(jax.random.normal(next(ks), (length, n)) * 2)
    inputs = jax.random.normal(next(ks), (length, 7, 7, 3))
    want = oracle.per_query_logits(b, params["base"], values, attention, inputs, task)
    for path in ("stacked", "patches"):
        c = config.replace(query_path=path)

        def library(w, v, a, t, c=c):
            return ep.base_learner_queries(w, v, a, inputs, c, t)

        got = jax.jit(library)(params["base"], values, attention, task)
        assert reference.relative_error(got, want) < 1e-10


def test_task_batching_modes_agree():
    config = tiny_config()
    params = mn.init(jax.random.key(1), config)
    support, query = tiny_batch(config, batch=3)
    # The jitted entry points: a host loop over one compiled per-task program vs vmap.
    loop_loss, loop_aux = episode_loss_fn(config.replace(task_batching="loop"))(
        params, support, query
    )
    vmap_loss, vmap_aux = episode_loss_fn(config.replace(task_batching="vmap"))(
        params, support, query
    )
    np.testing.assert_allclose(loop_loss, vmap_loss, rtol=1e-5)
    chex.assert_trees_all_close(loop_aux, vmap_aux, rtol=1e-4, atol=1e-6)
    logits = mn.make_predict(config.replace(task_batching="loop"))(params, support, query.x)
    np.testing.assert_allclose(logits, vmap_aux["logits"], rtol=1e-4, atol=1e-5)


def test_contrastive_rep_loss_and_sampled_pairs():
    config = tiny_config(shots=2)
    assert config.uses_contrastive
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(config)
    fn = episode_loss_fn(config)
    loss_a, _ = fn(params, support, query)
    loss_b, _ = fn(params, support, query)
    assert float(loss_a) == float(loss_b)  # no key: deterministic chunks of all pairs
    sampled = [float(fn(params, support, query, jax.random.key(k))[0]) for k in range(3)]
    assert all(np.isfinite(sampled))
    assert len(set(sampled)) > 1  # a key samples T pairs
    ce_loss, _ = episode_loss_fn(config.replace(rep_loss="ce"))(params, support, query)
    assert float(ce_loss) != float(loss_a)


def test_base_input_r_max_ways_and_attention_scale_match_loop_reference_float64(x64):
    # b is an MLP on u's representation r (MetaNetPartialU); 5 output units, 3-way episodes;
    # a sharpened memory read (attention_scale).
    config = tiny_config(
        base_input="r", max_ways=5, compute_dtype="float64", query_path="stacked",
        attention_scale=7.0,
    )  # fmt: skip
    params = _to64(mn.init(jax.random.key(0), config))
    assert params["base"]["out"]["kernel"].shape[-1] == 5
    assert set(params["base"]) == {"fc_0", "out"}
    support, query = tiny_batch(config, batch=1)
    support = mn.Episode(support.x.astype(jnp.float64), support.y)
    query = mn.Episode(query.x.astype(jnp.float64), query.y)
    loss, aux = jax.jit(lambda p, s, q: mn.episode_loss(p, s, q, config))(params, support, query)
    ref_loss, ref_logits, ref_att = reference.episode(params, config, support, query)
    assert aux["logits"].shape == (1, config.query_size, 3)
    assert reference.relative_error(aux["logits"], ref_logits) < 1e-10
    assert reference.relative_error(aux["attention"], ref_att) < 1e-10
    assert reference.relative_error(loss, ref_loss) < 1e-10


@pytest.mark.parametrize("architecture", ["mlp", "mini_imagenet_cnn"])
def test_other_architectures(architecture):
    config = tiny_config(
        architecture=architecture,
        image_shape=(7, 7, 3) if architecture != "mlp" else (5, 5, 1),
        batchnorm_layers=1 if architecture != "mlp" else None,
        num_conv_layers=3 if architecture != "mlp" else None,
    )
    params = mn.init(jax.random.key(0), config)
    if architecture == "mini_imagenet_cnn":
        assert "bn_conv_0" in params["base"]
        assert networks.augmented_names(config, "base") == ("conv_1", "conv_2", "fc_0", "out")
    support, query = tiny_batch(config)
    outs = {}
    for path in ("stacked", "patches"):
        outs[path] = episode_loss_fn(config.replace(query_path=path))(params, support, query)
    np.testing.assert_allclose(outs["stacked"][0], outs["patches"][0], rtol=1e-4)
    chex.assert_tree_all_finite(outs["stacked"])


def test_auto_query_path_resolves_by_backend():
    config = tiny_config(query_path="auto")
    assert config.resolved_query_path("cpu") == "patches"
    assert config.resolved_query_path("gpu") == "stacked"
    # The per-query path left the library (tests/model/oracle.py is its literal form): asking
    # for it raises, when the configuration is made or when the episode runs.
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(config)
    with pytest.raises(ValueError, match="query_path"):
        c = config.replace(query_path="per_query")
        mn.episode_loss(params, support, query, c)


def test_init_depends_only_on_architecture():
    a = mn.init(jax.random.key(7), tiny_config(shots=1, queries_per_class=2))
    b = mn.init(jax.random.key(7), tiny_config(shots=5, queries_per_class=9, rep_chunks=3))
    chex.assert_trees_all_equal(a, b)
    c = mn.init(jax.random.key(8), tiny_config())
    assert not np.allclose(a["base"]["out"]["kernel"], c["base"]["out"]["kernel"])


# ----------------------------------------------------------------------------- bad input
def _bad(config, params, support, query, match):
    fn = episode_loss_fn(config)
    with pytest.raises(ValueError, match=match):
        fn(params, support, query)


def test_bad_input_raises_value_error():
    config = tiny_config()
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(config)
    _bad(config, params, support._replace(y=support.y.at[0, 0].set(3)), query, "outside")
    _bad(config, params, support, query._replace(y=query.y.at[0, 0].set(-1)), "outside")
    _bad(config, params, mn.Episode(support.x[:, :2], support.y[:, :2]), query, "ways\\*shots")
    _bad(config, params, mn.Episode(support.x[:, :, :5], support.y), query, "image shape")
    _bad(config, params, support, mn.Episode(query.x[:1], query.y[:1]), "batch sizes differ")
    _bad(config, params, support._replace(y=support.y.astype(jnp.float32)), query, "integer")
    # Shapes are checked before compiling, also through .lower().
    with pytest.raises(ValueError, match="ways\\*shots"):
        episode_loss_fn(config).lower(params, mn.Episode(support.x[:, :2], support.y[:, :2]), query)
    # validate=False skips the label-value check (no host sync) but still checks shapes.
    fn = mn.make_episode_loss(config, validate=False)
    fn(params, support._replace(y=support.y.at[0, 0].set(3)), query)
    with pytest.raises(ValueError, match="image shape"):
        fn(params, mn.Episode(support.x[:, :, :5], support.y), query)


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("variant", "metanet++", "variant"),
        ("architecture", "resnet", "architecture"),
        ("ways", 0, "ways"),
        ("shots", -1, "shots"),
        ("queries_per_class", 0, "queries_per_class"),
        ("rep_chunks", 0, "rep_chunks"),
        ("image_shape", (28, 28), "image_shape"),
        ("max_ways", 2, "max_ways"),
        ("query_path", "fast", "query_path"),
        ("task_batching", "pmap", "task_batching"),
        ("attention_scale", 0.0, "attention_scale"),
        ("attention_scale", "sharp", "attention_scale"),
    ],
)
def test_bad_config_raises(field, value, match):
    with pytest.raises(ValueError, match=match):
        tiny_config(**{field: value})


def test_unknown_augmented_layer_raises():
    with pytest.raises(ValueError, match="do not exist"):
        mn.init(jax.random.key(0), tiny_config(augment_base=("conv_9",)))


def test_lowering_compiles():
    config = tiny_config(task_batching="vmap")
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(config)
    compiled = episode_loss_fn(config).lower(params, support, query).compile()
    loss, _ = compiled(params, support, query)
    np.testing.assert_allclose(loss, mn.episode_loss(params, support, query, config)[0], rtol=1e-5)


def test_import_does_not_pull_tensorflow():
    import subprocess
    import sys

    code = (
        "import sys, metanet_jax, metanet_jax.training; "
        "bad = [m for m in ('tensorflow', 'tensorflow_datasets') if m in sys.modules]; "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_chunk_layout_is_balanced_and_ordered():
    index, mask = ep.chunk_layout(7, 3)
    assert mask.sum(1).tolist() == [3, 2, 2]
    assert index[mask > 0].tolist() == list(range(7))
    index, mask = ep.chunk_layout(3, 5)  # min(T, N) chunks of one
    assert index.shape == (3, 1) and mask.all()


def _permute_units(params, perm):
    """b's output layer and u's head with their output units reordered: unit k -> perm[k]."""
    out = jax.tree.map(lambda x: x, params)
    for group, layer in (("base", networks.OUTPUT_LAYER), ("representation", networks.HEAD_LAYER)):
        kernel = params[group][layer]["kernel"]
        out[group][layer] = {"kernel": jnp.zeros_like(kernel).at[:, perm].set(kernel)}
    return out


def test_label_units_any_is_invariant_to_where_the_units_are(x64):
    """With label_units="any", relabelling an episode's classes to other units and moving those
    units' weights there gives the same loss, logits and gradients (a closed-form symmetry);
    with labels 0..ways-1 the loss is "first"'s."""
    first = tiny_config(max_ways=7, compute_dtype="float64")
    anyu = first.replace(label_units="any")
    params = jax.tree.map(lambda x: x.astype(jnp.float64), mn.init(jax.random.key(0), first))
    support, query = tiny_batch(first, batch=1, seed=3)
    support = mn.Episode(support.x.astype(jnp.float64), support.y)
    query = mn.Episode(query.x.astype(jnp.float64), query.y)
    loss_first = jax.jit(lambda p, s, q: mn.episode_loss(p, s, q, first)[0])(params, support, query)

    def loss_logits(p, s, q):
        loss, aux = mn.episode_loss(p, s, q, anyu)
        return loss, aux["logits"][0]

    value_and_grad = jax.jit(jax.value_and_grad(loss_logits, has_aux=True))
    (loss_any, _), g_any = value_and_grad(params, support, query)
    np.testing.assert_allclose(loss_any, loss_first, rtol=1e-12)

    perm = np.array([4, 0, 6, 1, 2, 3, 5])  # label k -> unit perm[k]
    moved = _permute_units(params, perm)
    relabel = lambda e: mn.Episode(e.x, jnp.asarray(perm)[e.y])
    (loss_moved, logits), g_moved = value_and_grad(moved, relabel(support), relabel(query))
    np.testing.assert_allclose(loss_moved, loss_any, rtol=1e-10)
    logits = np.asarray(logits)
    assert logits.shape[-1] == 7
    present = perm[: first.ways]
    absent = np.setdiff1d(np.arange(7), present)
    assert np.all(logits[:, absent] == -1e9)
    back = _permute_units(g_any, perm)  # the gradients move with the units
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(g_moved), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    # Units no support label names get no gradient from this episode.
    out_grad = np.asarray(g_moved["base"][networks.OUTPUT_LAYER]["kernel"])
    assert np.all(out_grad[:, absent] == 0) and np.any(out_grad[:, present] != 0)


@pytest.mark.parametrize("which", ["generator", "network"])
def test_authors_init_is_chainer_default(which):
    """Chainer v1: every linear/conv weight N(0, 1/fan_in), biases and LSTM forget bias 0."""
    small = tiny_config(conv_channels=8, hidden_units=16, lstm_hidden=32, generator_hidden=32)
    authors = small.replace(**{f"{which}_init": "authors"})
    p_small, p_auth = (mn.init(jax.random.key(0), c) for c in (small, authors))
    if which == "generator":
        groups = ("example_generator", "task_generator")
        for g in ("base", "representation"):  # b and u unchanged
            chex.assert_trees_all_equal(p_small[g], p_auth[g])
        lstm = p_auth["task_generator"]["representation"]["conv"]
        assert np.all(np.asarray(lstm["bias"]) == 0)  # forget gate included
        assert np.all(
            np.asarray(p_small["task_generator"]["representation"]["conv"]["bias"])[32:64] == 1
        )
    else:
        groups = ("base", "representation")
        for g in ("example_generator", "task_generator"):
            chex.assert_trees_all_equal(p_small[g], p_auth[g])
    flat = jax.tree_util.tree_leaves_with_path({g: p_auth[g] for g in groups})
    pooled = []  # kernel * sqrt(fan_in) should be N(0, 1) over all kernels
    for path, leaf in flat:
        name = jax.tree_util.keystr(path)
        leaf = np.asarray(leaf)
        if "bias" in name:
            assert np.all(leaf == 0), name
            continue
        fan_in = int(np.prod(leaf.shape[:-1]))
        pooled.append((leaf * np.sqrt(fan_in)).ravel())
    z = np.concatenate(pooled)
    assert z.size > 2000
    np.testing.assert_allclose(z.std(), 1.0, atol=0.05)
    np.testing.assert_allclose(z.mean(), 0.0, atol=0.05)
    assert np.abs(z).max() > 2.5  # not truncated at 2 sigma (He's truncated normal is)
