"""The kernels built for other x86-64 targets than this machine: `-march=x86-64-v3` (AVX2 and
FMA, no AVX-512: 8-lane vectors) and `-march=x86-64` (SSE2 only: 4-lane vectors, no FMA), so
that the paths a machine without AVX-512 compiles (csrc/lstm.cc's portable vectors, and
mlp.cc's) are tested here too. Each is built (`build.build(flags=..., output=...)`, both at
once) into a temporary folder, registered under its own FFI target names and checked against
the XLA path like tests/kernels/test_ops.py does: values and gradients, coordinate counts that
are not a multiple of the vector width, several chunks; determinism.

Runs on x86-64 machines (elsewhere the native build is the portable path, and test_ops.py
checks it). A failed build fails, never skips.
"""

from __future__ import annotations

import ctypes
import platform
import shlex
import threading

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from metanet_jax.kernels import _loader, _ops, build
from metanet_jax.model import generators as gen
from tests.kernels.test_ops import _compare, _features, _lstm_weights, _mlp_weights

MARCHES = ["x86-64-v3", "x86-64"]

pytestmark = pytest.mark.skipif(
    platform.machine().lower() not in ("x86_64", "amd64"),
    reason="-march=x86-64* targets need an x86-64 compiler (the native build is tested)",
)


@pytest.fixture(scope="module")
def ops(tmp_path_factory):
    """march -> (mlp_core, lstm_core) of the library built for it."""
    folder = tmp_path_factory.mktemp("kernels")
    paths, errors = {}, {}

    def one(march):
        try:
            paths[march] = build.build(
                flags=[f"-march={march}"], output=folder / f"{march}.so", verbose=False
            )
        except Exception as e:  # noqa: BLE001 (reported below)
            errors[march] = e

    threads = [threading.Thread(target=one, args=(m,)) for m in MARCHES]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    result = {}
    for march, path in paths.items():
        assert build.library_target_flags(path) == shlex.join([f"-march={march}"])
        lib = ctypes.CDLL(str(path))
        suffix = "_" + march.replace("-", "_")
        for target, symbol in _loader.TARGETS.items():
            capsule = jax.ffi.pycapsule(getattr(lib, symbol))
            jax.ffi.register_ffi_target(target + suffix, capsule, platform="cpu")
        result[march] = (*_ops.make_ops(suffix), lib)  # the library stays loaded
    return result


def _seq(key, steps, coords):
    return jnp.moveaxis(_features(jax.random.key(key), (steps, coords)), 0, 1)  # [T, 2, P]


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize("hidden,coords", [(20, 1), (20, 8192 * 2 + 37), (33, 333)])
def test_mlp_matches_xla(ops, march, hidden, coords):
    weights = _mlp_weights(jax.random.key(coords), hidden)
    feats = _features(jax.random.key(coords + 1), (coords,))
    _compare(ops[march][0], gen._mlp_core, weights, feats)


@pytest.mark.parametrize("march", MARCHES)
@pytest.mark.parametrize(
    "hidden,steps,coords",
    [(20, 1, 1), (20, 5, 77), (20, 3, 2048 * 2 + 37), (7, 2, 19), (64, 4, 151)],
)
def test_lstm_matches_xla(ops, march, hidden, steps, coords):
    weights = _lstm_weights(jax.random.key(coords), hidden)
    _compare(ops[march][1], gen._lstm_core, weights, _seq(steps, steps, coords))


@pytest.mark.parametrize("march", MARCHES)
def test_bitwise_deterministic(ops, march):
    mlp_core, lstm_core, _ = ops[march]
    mw = _mlp_weights(jax.random.key(0), 20)
    lw = _lstm_weights(jax.random.key(1), 20)
    x = _features(jax.random.key(2), (20_000,))
    seq = _seq(3, 3, 10_000)
    grad_m = jax.jit(jax.grad(lambda w, x: jnp.sum(mlp_core(*w, x) ** 2), (0, 1)))
    grad_d = jax.jit(jax.grad(lambda w, x: jnp.sum(lstm_core(*w, x) ** 2), (0, 1)))
    for fn, args in ((grad_m, (mw, x)), (grad_d, (lw, seq))):
        first = jax.tree.map(np.asarray, fn(*args))
        for _ in range(2):
            for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(fn(*args)), strict=True):
                np.testing.assert_array_equal(a, np.asarray(b))
