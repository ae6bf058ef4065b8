"""MetaNet on recurrent networks (issue 21): the augmented LSTM cell and `rows_lstm`.

* the cell (under `nn.RNN`, under `nn.scan`) and `AugmentedLSTM` against an LSTM written in
  numpy (float64), with the same slow kernels and every form of fast weights;
* per-example support gradients through the recurrence (`vmap(grad)`) against one
  `jax.grad` per example;
* the built-in `rows_lstm`: loss, logits and outer gradients against the independent loop
  reference (tests/model/reference.py, float64) for MetaNet-, MetaNet and MetaNet+, and
  the same model written by a user with `nn.RNN` of the cell;
* a user-written recurrent module trained end to end on synthetic episodes learns fresh
  classes.
"""

from __future__ import annotations

import time
from pathlib import Path

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

import metanet_jax as mn
from metanet_jax.model import episode as ep
from metanet_jax.model import layers, networks
from tests.conftest import tiny_config
from tests.model import reference

N, T, D, H = 3, 4, 5, 6  # examples, steps, input features, hidden units
S = 4  # memory slots


# ----------------------------------------------------------------------------- numpy LSTM
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def numpy_lstm(x, wx, wh, b, fx=None, fh=None):
    """The LSTM of the cell's docstring, written out in numpy: `x` `[n, T, D]`, slow kernels
    `wx` `[D, 4H]`, `wh` `[H, 4H]`, bias `b` `[4H]`, fast kernels per example `fx`
    `[n, D, 4H]`, `fh` `[n, H, 4H]` (or `None`); gates i, f, g, o. Returns `[n, T, H]`."""
    n, steps, _ = x.shape
    hid = wh.shape[0]
    h, c, out = np.zeros((n, hid)), np.zeros((n, hid)), []
    for t in range(steps):
        z = x[:, t] @ wx + h @ wh + b
        if fx is not None:
            z = z + np.einsum("nd,ndf->nf", x[:, t], fx) + np.einsum("nd,ndf->nf", h, fh)
        i, f, g, o = (z[:, k * hid : (k + 1) * hid] for k in range(4))
        c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
        h = _sigmoid(o) * np.tanh(c)
        out.append(h)
    return np.stack(out, 1)


class _UnderRNN(nn.Module):
    @nn.compact
    def __call__(self, x):
        cell = layers.AugmentedLSTMCell(H, name="cell")
        return nn.RNN(cell, variable_broadcast=layers.RNN_BROADCAST)(x)


class _UnderScan(nn.Module):
    """The cell under `nn.scan` over the time axis, as a user would write it by hand."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(
            layers.AugmentedLSTMCell, variable_broadcast=layers.RNN_BROADCAST,
            split_rngs={"params": False}, in_axes=1, out_axes=1,
        )  # fmt: skip
        cell = scan(H, name="cell")
        carry = cell.initialize_carry(jax.random.key(0), x[:, 0].shape)
        return cell(carry, x)[1]


class _Sequence(nn.Module):
    @nn.compact
    def __call__(self, x):
        return layers.AugmentedLSTM(H, name="cell")(x)


MODULES = {"nn.RNN": _UnderRNN, "nn.scan": _UnderScan, "AugmentedLSTM": _Sequence}


def _fast_forms(rng):
    """Every form of fast weights, as `(collection for "cell", per-example fx, fh)`."""
    kx, kh = rng.normal(size=(D, 4 * H)), rng.normal(size=(H, 4 * H))
    px, ph = rng.normal(size=(N, D, 4 * H)), rng.normal(size=(N, H, 4 * H))
    mx, mh = rng.normal(size=(S, D, 4 * H)), rng.normal(size=(S, H, 4 * H))
    mix = rng.dirichlet(np.ones(S), size=N)
    tx, th = rng.normal(size=(D, 4 * H)), rng.normal(size=(H, 4 * H))

    def ex(k):
        return np.broadcast_to(k, (N,) + k.shape)

    def entry(**kw):
        return {k: jnp.asarray(v) for k, v in kw.items()}

    read_x, read_h = np.einsum("ns,sdf->ndf", mix, mx), np.einsum("ns,sdf->ndf", mix, mh)
    return {
        "none": (None, None, None),
        "shared": (
            {"input": entry(kernel=kx), "recurrent": entry(kernel=kh)}, ex(kx), ex(kh)
        ),
        "per_example": ({"input": entry(kernel=px), "recurrent": entry(kernel=ph)}, px, ph),
        "memory": (
            {"input": entry(kernel=mx, mix=mix), "recurrent": entry(kernel=mh, mix=mix)},
            read_x, read_h,
        ),
        "memory_and_task": (
            {"input": entry(kernel=mx, mix=mix, task_kernel=tx),
             "recurrent": entry(kernel=mh, mix=mix, task_kernel=th)},
            read_x + tx, read_h + th,  # linear paths: the task path adds its kernel
        ),
    }  # fmt: skip


@pytest.mark.parametrize("module", list(MODULES))
def test_the_cell_is_the_numpy_lstm_with_slow_and_fast_kernels(x64, module):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, T, D))
    net = MODULES[module]()
    variables = net.init(jax.random.key(1), jnp.asarray(x))
    params = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), variables["params"])
    assert set(params["cell"]) == {"input", "recurrent", "bias"}
    # The "fast" template: the two kernels, zeros, shaped like the slow ones.
    template = variables[layers.FAST]["cell"]
    assert {k: v["kernel"].shape for k, v in template.items()} == {
        "input": (D, 4 * H), "recurrent": (H, 4 * H)
    }  # fmt: skip
    slow = params["cell"]
    args = [np.asarray(a) for a in (slow["input"]["kernel"], slow["recurrent"]["kernel"])]
    run = jax.jit(lambda v: net.apply(v, jnp.asarray(x)))
    for form, (fast, fx, fh) in _fast_forms(rng).items():
        variables = {"params": params}
        if fast is not None:
            variables[layers.FAST] = {"cell": fast}
        got = run(variables)
        want = numpy_lstm(x, *args, np.asarray(slow["bias"]), fx, fh)
        assert got.shape == (N, T, H)
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13, err_msg=form)
        if fast is not None:  # the fast weights change the output (not a 0 == 0 check)
            assert np.abs(want - numpy_lstm(x, *args, np.asarray(slow["bias"]))).max() > 1e-2


def test_the_cell_initialises_the_forget_gate_bias_and_its_carry():
    cell = layers.AugmentedLSTMCell(H, forget_bias=2.0)
    carry = cell.initialize_carry(jax.random.key(0), (N, D))
    variables = cell.init(jax.random.key(1), carry, jnp.zeros((N, D)))
    bias = np.asarray(variables["params"]["bias"])
    np.testing.assert_array_equal(bias, np.repeat([0.0, 2.0, 0.0, 0.0], H))
    assert [c.shape for c in carry] == [(N, H), (N, H)]
    # A non-augmented cell writes no template and refuses fast weights.
    plain = layers.AugmentedLSTMCell(H, augmented=False)
    variables = plain.init(jax.random.key(1), carry, jnp.zeros((N, D)))
    assert layers.FAST not in variables
    fast = {"input": {"kernel": jnp.zeros((D, 4 * H))}}
    with pytest.raises(ValueError, match="non-augmented layer"):
        plain.apply({"params": variables["params"], layers.FAST: fast}, carry, jnp.zeros((N, D)))


def test_the_cell_under_nn_rnn_without_the_fast_collection_broadcast_says_so():
    class Forgot(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.RNN(layers.AugmentedLSTMCell(H))(x)

    with pytest.raises(ValueError, match="variable_broadcast=layers.RNN_BROADCAST"):
        Forgot().init(jax.random.key(0), jnp.zeros((N, T, D)))


def test_per_example_gradients_through_the_recurrence_are_each_examples_own(x64):
    """`vmap(grad)` over examples through the scan = one `jax.grad` per example, and
    differs from the batch gradient (so the check is not vacuous)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(N, T, D)))
    net = _Sequence()
    params = net.init(jax.random.key(0), x)["params"]
    targets = jnp.asarray(rng.normal(size=(N, H)))

    def loss(p, xi, yi):  # one example
        return jnp.sum(jnp.square(net.apply({"params": p}, xi[None])[0, -1] - yi))

    per_example = jax.jit(jax.vmap(jax.grad(loss), (None, 0, 0)))(params, x, targets)
    for i in range(N):
        one = jax.grad(loss)(params, x[i], targets[i])
        chex.assert_trees_all_close(jax.tree.map(lambda g, i=i: g[i], per_example), one,
                                    rtol=1e-12, atol=1e-14)  # fmt: skip
    kernels = per_example["cell"]["recurrent"]["kernel"]
    assert float(jnp.abs(kernels[0] - kernels[1]).max()) > 1e-3


# ----------------------------------------------------------------------------- rows_lstm
def _to64(tree):
    return jax.tree.map(lambda x: x.astype(jnp.float64) if x.dtype == jnp.float32 else x, tree)


def _rows_case(variant, **overrides):
    config = tiny_config(**{
        **dict(architecture="rows_lstm", image_shape=(4, 3, 1), hidden_units=4,
               variant=variant, compute_dtype="float64", query_path="stacked",
               task_batching="vmap", queries_per_class=1),
        **overrides,
    })  # fmt: skip
    params = _to64(mn.init(jax.random.key(0), config))
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(1), config, 1)
    support = mn.Episode(support.x.astype(jnp.float64), support.y)
    query = mn.Episode(query.x.astype(jnp.float64), query.y)
    return config, params, support, query


def test_rows_lstm_layers_and_params():
    config = mn.MetaNetConfig(architecture="rows_lstm", ways=5, max_ways=20)
    assert config.resolved("hidden_units") == 64
    assert networks.layer_names(config, "base") == ("lstm", "fc_0", "out")
    assert networks.layer_names(config, "representation") == ("lstm", "key")
    params = mn.init(jax.random.key(0), config)
    shapes = jax.tree.map(lambda a: a.shape, params)
    assert shapes["base"] == {
        "lstm": {"input": {"kernel": (28, 256)}, "recurrent": {"kernel": (64, 256)},
                 "bias": (256,)},
        "fc_0": {"kernel": (64, 64)}, "out": {"kernel": (64, 20)},
    }  # fmt: skip
    assert shapes["representation"]["key"] == {"kernel": (64, 64)}
    b, u = networks.learners(config)
    assert b.kinds == u.kinds == ("dense",)  # the LSTM's kernels use the dense m and d
    assert set(b.augmented) == {"lstm", "fc_0", "out"} and set(u.augmented) == {"lstm", "key"}
    # augment_base chooses layers by name: "lstm" is both of its kernels.
    only = networks.learners(config.replace(augment_base=("lstm",)))[0]
    assert set(only.augmented) == {"lstm"} and set(only.augmented["lstm"]) == {
        "input", "recurrent"
    }  # fmt: skip


@pytest.mark.parametrize("variant", ["metanet", "metanet-", "metanet+"])
def test_rows_lstm_loss_and_outer_gradients_match_the_loop_reference(x64, variant):
    config, params, support, query = _rows_case(variant)

    def library(p):
        loss, aux = mn.episode_loss(p, support, query, config)
        return loss, (aux["logits"], aux["attention"])

    def ref(p):
        loss, logits, attention = reference.episode(p, config, support, query)
        return loss, (logits, attention)

    (loss, (logits, att)), grads = jax.jit(jax.value_and_grad(library, has_aux=True))(params)
    (ref_loss, (ref_logits, ref_att)), ref_grads = jax.value_and_grad(ref, has_aux=True)(params)
    assert reference.relative_error(loss, ref_loss) < 1e-10
    assert reference.relative_error(logits, ref_logits) < 1e-10
    assert reference.relative_error(att, ref_att) < 1e-10
    for group in ("base", "representation", "example_generator", "task_generator"):
        err = reference.norm_relative_error(grads[group], ref_grads[group])
        assert err <= 1e-8, (group, err)
    for which in ("base", "representation"):  # the LSTM's slow weights get their gradient
        lstm = ref_grads[which]["lstm"]
        for leaf in (lstm["input"]["kernel"], lstm["recurrent"]["kernel"], lstm["bias"]):
            assert float(jnp.abs(leaf).max()) > 0
    if variant != "metanet-":
        assert float(jnp.abs(ref_grads["task_generator"]["representation"]["dense"][
            "input_kernel"]).max()) > 0  # fmt: skip


class _UserRowsBase(nn.Module):
    """The built-in rows_lstm b written by a user with `nn.RNN` of the cell."""

    hidden: int
    outputs: int

    @nn.compact
    def __call__(self, x):
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        cell = layers.AugmentedLSTMCell(self.hidden, name="lstm")
        h = nn.RNN(cell, variable_broadcast=layers.RNN_BROADCAST)(rows)[:, -1]
        h = layers.AugmentedDense(self.hidden, name="fc_0")(h)
        return layers.AugmentedDense(self.outputs, linear=True, name="out")(h)


class _UserRowsKeys(nn.Module):
    hidden: int

    @nn.compact
    def __call__(self, x):
        rows = x.reshape(x.shape[0], x.shape[1], -1)
        cell = layers.AugmentedLSTMCell(self.hidden, name="lstm")
        h = nn.RNN(cell, variable_broadcast=layers.RNN_BROADCAST)(rows)[:, -1]
        return layers.AugmentedDense(self.hidden, linear=True, name="key")(h)


@pytest.mark.parametrize("query_path", ["stacked", "patches"])
def test_the_cell_under_nn_rnn_gives_the_built_in_rows_lstm(x64, query_path):
    """The same params through a user's `nn.RNN` of the cell (the memory mixed at every
    step) and through the built-in (`AugmentedLSTM`, W*_j built once): the same MetaNet."""
    config, params, support, query = _rows_case("metanet+", query_path=query_path)
    hidden = config.resolved("hidden_units")
    nets = mn.Networks(_UserRowsBase(hidden, config.output_units), _UserRowsKeys(hidden))
    fresh = mn.init(jax.random.key(0), config, networks=nets)
    chex.assert_trees_all_equal_shapes(_to64(fresh), params)

    def run(networks_or_none):
        def loss(p):
            return mn.episode_loss(p, support, query, config, networks=networks_or_none)[0]

        return jax.jit(jax.value_and_grad(loss))(params)

    (loss_b, grads_b), (loss_u, grads_u) = run(None), run(nets)
    np.testing.assert_allclose(loss_u, loss_b, rtol=1e-12)
    chex.assert_trees_all_close(grads_u, grads_b, rtol=1e-9, atol=1e-13)


# ----------------------------------------------------------------------------- end to end
class RecurrentBase(nn.Module):
    """b: the sequence `[n, L, 1, C]` through an augmented LSTM, then the logits."""

    ways: int

    @nn.compact
    def __call__(self, x):
        rnn = nn.RNN(layers.AugmentedLSTMCell(16), variable_broadcast=layers.RNN_BROADCAST)
        h = rnn(x.reshape(x.shape[0], x.shape[1], -1))[:, -1]
        return layers.AugmentedDense(self.ways, linear=True)(h)


class RecurrentKeys(nn.Module):
    """u: an augmented LSTM and a linear key layer."""

    @nn.compact
    def __call__(self, x):
        rnn = nn.RNN(layers.AugmentedLSTMCell(16), variable_broadcast=layers.RNN_BROADCAST)
        h = rnn(x.reshape(x.shape[0], x.shape[1], -1))[:, -1]
        return layers.AugmentedDense(16, linear=True)(h)


STEPS = 400


def test_a_user_recurrent_model_learns_fresh_classes_from_one_example():
    config = mn.MetaNetConfig(ways=5, shots=1, queries_per_class=3, image_shape=(8, 1, 2),
                              rep_chunks=2, lstm_hidden=8, generator_hidden=8,
                              attention_scale=10.0, learning_rate=1e-2)  # fmt: skip
    nets = mn.Networks(base=RecurrentBase(config.ways), representation=RecurrentKeys())
    params = mn.init(jax.random.key(0), config, networks=nets)
    assert set(params["example_generator"]) == {"dense"}
    assert set(params["base"]["AugmentedLSTMCell_0"]) == {"input", "recurrent", "bias"}
    optimizer = mn.make_optimizer(config)
    noise = 0.2

    def loss_fn(p, support, query):
        def one(sx, sy, qx, qy):
            return mn.task_loss(p, mn.Episode(sx, sy), mn.Episode(qx, qy), config, networks=nets)

        losses, aux = jax.vmap(one)(support.x, support.y, query.x, query.y)
        return jnp.mean(losses), aux["accuracy"]

    @jax.jit
    def step(p, opt_state, key):
        support, query = mn.synthetic.synthetic_episodes(key, config, 4, noise)
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, support, query)
        updates, opt_state = optimizer.update(grads, opt_state, p)
        return optax.apply_updates(p, updates), opt_state, loss

    @jax.jit
    def accuracy(p, key):  # 200 episodes of classes never seen in training
        support, query = mn.synthetic.synthetic_episodes(key, config, 200, noise)
        return jnp.mean(loss_fn(p, support, query)[1])

    start = time.perf_counter()
    before = float(accuracy(params, jax.random.key(10**6)))
    opt_state = optimizer.init(params)
    for i in range(STEPS):
        params, opt_state, loss = step(params, opt_state, jax.random.key(i))
    after = float(accuracy(params, jax.random.key(10**6)))
    print(f"\nrecurrent model: fresh-class accuracy {before:.3f} -> {after:.3f} in {STEPS} steps, "
          f"{time.perf_counter() - start:.0f} s")  # fmt: skip
    assert before < 0.45  # chance is 0.2
    assert after >= 0.8
    assert np.isfinite(float(loss))


def test_rows_lstm_query_paths_agree_float32():
    config = tiny_config(architecture="rows_lstm", image_shape=(5, 4, 1), hidden_units=6)
    params = mn.init(jax.random.key(2), config)
    support, query = mn.synthetic.synthetic_episodes(jax.random.key(3), config, 2)
    out = {}
    for path in ("stacked", "patches"):
        c = config.replace(query_path=path)
        loss = jax.jit(lambda p, s, q, c=c: mn.episode_loss(p, s, q, c)[1]["logits"])
        out[path] = loss(params, support, query)
    np.testing.assert_allclose(out["patches"], out["stacked"], rtol=1e-5, atol=1e-5)
    b, _ = networks.learners(config)
    assert ep.query_path(config) in layers.MEMORY_MODES and b.kinds == ("dense",)


def test_the_readme_recurrent_example_runs_as_written():
    """README's "Your own recurrent network" block, executed as it stands."""
    text = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = text.split("## Your own recurrent network", 1)[1]
    code = section.split("```python\n", 1)[1].split("```", 1)[0]
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102
    assert np.isfinite(float(scope["loss"])) and np.isfinite(float(scope["metrics"]["loss"]))
    lstm = scope["params"]["base"]["AugmentedLSTMCell_0"]
    assert lstm["recurrent"]["kernel"].shape == (32, 128)
