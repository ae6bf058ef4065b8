"""The fused generator kernels in the model: the fast-weight trees (conv and dense kinds), a
whole episode's loss and outer gradients (first and second order, the vmap and loop task
batchings) against the XLA path, and against the float64 loop reference of tests/model at
float32 tolerances.

The kernels must be built (`make kernels`): these tests fail, never skip, when they are not.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import metanet_jax as mn
from metanet_jax import kernels
from metanet_jax.model import generators as gen
from tests.conftest import tiny_batch, tiny_config
from tests.model import reference

GROUPS = ("base", "representation", "example_generator", "task_generator")  # W, Q, Z, G


@pytest.fixture(scope="module", autouse=True)
def built():
    assert kernels.fused_available(), kernels.unavailable_reason()


def _randomize(params, key, scale=0.7):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree.unflatten(
        tree, [jax.random.normal(k, x.shape) * scale for k, x in zip(keys, leaves, strict=True)]
    )


def _meta_info(key, lead):
    """Gradient-like meta information of a conv and a dense layer, `lead` leading rows."""
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "conv_0": {"kernel": jax.random.normal(k1, (lead, 3, 3, 2, 5)) * 1e-2},
        "block": {"dense_0": {"kernel": jax.random.normal(k2, (lead, 7, 3)) * 1e-3}},
        "conv_1": {"kernel": jax.random.normal(k3, (lead, 3, 3, 5, 1)) * 1e-1},
    }


def _close(got, want, rtol, what):
    err = reference.norm_relative_error(got, want)
    assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"
    return err


@pytest.mark.parametrize("which", ["example", "task_T1", "task_T4"])
def test_fast_weight_trees_match_xla(which):
    """m over N examples and d over T chunks on conv and dense leaves: values and the
    gradients of Z / G and of the meta information (second order)."""
    key = jax.random.key(0)
    if which == "example":
        generate, lead = gen.example_fast_weights, 3
        params = {
            kind: _randomize(gen.init_mlp_generator(jax.random.fold_in(key, i), 20), key)
            for i, kind in enumerate(("conv", "dense"))
        }
    else:
        generate, lead = gen.task_fast_weights, int(which[-1])
        params = {
            kind: _randomize(gen.init_lstm_generator(jax.random.fold_in(key, i), 20), key)
            for i, kind in enumerate(("conv", "dense"))
        }
    meta = _meta_info(jax.random.key(1), lead)
    weights = jax.tree.map(lambda x: jnp.cos(jnp.arange(x.size).reshape(x.shape[-x.ndim:])),
                           generate(params, meta))  # fmt: skip

    def loss(kernel, p, m):
        out = generate(p, m, kernel=kernel)
        return sum(jnp.sum(jnp.sin(3 * a) * w) for a, w in
                   zip(jax.tree.leaves(out), jax.tree.leaves(weights), strict=True))  # fmt: skip

    values = {k: jax.jit(lambda p, m, k=k: generate(p, m, kernel=k))(params, meta)
              for k in ("xla", "fused")}  # fmt: skip
    _close(values["fused"], values["xla"], 1e-5, "values")
    grad = jax.jit(jax.grad(loss, argnums=(1, 2)), static_argnums=0)
    (gp_f, gm_f), (gp_x, gm_x) = grad("fused", params, meta), grad("xla", params, meta)
    for kind in ("conv", "dense"):
        _close(gp_f[kind], gp_x[kind], 1e-5, f"generator {kind}")
    _close(gm_f, gm_x, 1e-5, "meta information")
    assert reference.norm_relative_error(gm_x, jax.tree.map(jnp.zeros_like, gm_x)) > 0


# Base case (first order: the kernels skip the features' cotangent), second order (the
# features' cotangent through the kernels), the MLP network in the vmap task batching (dense
# kind only; the FFI calls vmapped over the tasks).
CASES = {
    "base": {},
    "second_order": dict(second_order=True),
    "mlp_vmap": dict(architecture="mlp", task_batching="vmap", second_order=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_episode_loss_and_gradients_match_xla(name):
    """A whole MetaNet episode (tiny networks, 2 tasks): loss, logits and the outer gradients
    of W, Q, Z and G with the fused kernels against the XLA path, both float32."""
    results = {}
    for kernel in ("xla", "fused"):
        config = tiny_config(generator_kernel=kernel, **CASES[name])
        assert config.resolved_generator_kernel() == kernel
        params = mn.init(jax.random.key(0), config)
        support, query = tiny_batch(config, batch=2)

        def library(p, config=config, support=support, query=query):
            loss, aux = mn.episode_loss(p, support, query, config)
            return loss, aux["logits"]

        results[kernel] = jax.jit(jax.value_and_grad(library, has_aux=True))(params)
    ((loss_x, logits_x), grads_x), ((loss_f, logits_f), grads_f) = results["xla"], results["fused"]
    assert reference.relative_error(loss_f, loss_x) < 1e-5
    assert reference.relative_error(logits_f, logits_x) < 1e-5
    for group in GROUPS:
        _close(grads_f[group], grads_x[group], 1e-4, group)


@pytest.mark.parametrize(
    "architecture",
    [dict(architecture="mlp"), dict(query_path="stacked", image_shape=(5, 5, 1))],
    ids=["mlp", "cnn"],
)
def test_fused_float32_matches_the_float64_loop_reference(x64, architecture):
    """The independent float64 loop reference (tests/model/reference.py) against the fused
    float32 path: loss, logits and outer gradients (second order: through the features'
    cotangents too) at float32 tolerances; the dense kind alone (MLP networks) and the conv
    and dense kinds (CNN)."""
    config = tiny_config(generator_kernel="fused", task_batching="vmap", second_order=True,
                         queries_per_class=1, **architecture)  # fmt: skip
    params = mn.init(jax.random.key(0), config)
    support, query = tiny_batch(config, batch=1)

    def library(p):
        loss, aux = mn.episode_loss(p, support, query, config)
        return loss, aux["logits"]

    (loss, logits), grads = jax.jit(jax.value_and_grad(library, has_aux=True))(params)
    to64 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float64), t)  # noqa: E731
    s64 = mn.Episode(support.x.astype(jnp.float64), support.y)
    q64 = mn.Episode(query.x.astype(jnp.float64), query.y)
    config64 = config.replace(compute_dtype="float64", generator_kernel="xla")

    def ref(p):
        loss, logits, _ = reference.episode(p, config64, s64, q64)
        return loss, logits

    (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(ref, has_aux=True))(to64(params))
    assert loss.dtype == jnp.float32 and ref_loss.dtype == jnp.float64
    assert reference.relative_error(loss, ref_loss) < 1e-5
    assert reference.relative_error(logits, ref_logits) < 1e-5
    for group in GROUPS:
        _close(grads[group], ref_grads[group], 1e-4, group)
        assert any(np.any(np.asarray(x)) for x in jax.tree.leaves(ref_grads[group])), group
