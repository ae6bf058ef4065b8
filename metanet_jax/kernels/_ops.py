"""The fused generators as JAX functions: `jax.custom_vjp`s whose forward and backward are the
FFI calls of `csrc/` (ABI in csrc/kernels.h).

`mlp_core(w0, b0, w1, b1, w2, b2, x)` and `lstm_core(wx, wh, b, wo, bo, feats)` compute exactly
what `generators._mlp_core` and `generators._lstm_core` compute (the XLA path, the reference),
in float32 on the CPU. Their VJPs give the cotangents of every weight and, when the features
take part in differentiation (`second_order`), of the features; when the features are constants
(`stop_gradient`, the first-order default) the kernels skip that product (`need_dx=False`).

Reverse mode only: forward mode (`jax.jvp`, `jacfwd`) and reverse-over-reverse (a gradient of
these VJPs, e.g. a Hessian-vector product through the generators) are not implemented and raise;
the XLA path (`generator_kernel="xla"`) supports reverse-over-reverse.

Under `jax.vmap` each call runs once per batch element (`vmap_method="sequential"`), which is
correct for batched weights or features alike; the training code calls the generators on
flattened coordinates of one task, and vmaps them only in the "vmap" task batching and the
sharded step.

`make_ops(suffix)` makes the same two ops bound to the FFI targets `metanet_*{suffix}`: the
tests register a library built for another target (`-march`) under a suffix and check it.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from metanet_jax.kernels import _loader

_F32 = jnp.float32


def _require(*targets: str) -> None:
    registered, reason = _loader.load()
    if not all(t in registered for t in targets):
        raise RuntimeError(f"the fused generator kernels are not available: {reason}")


def _check_f32(*arrays) -> None:
    for a in arrays:
        if a.dtype != _F32:
            raise TypeError(f"the fused generator kernels take float32, got {a.dtype}")


def _call(target, results, *args, **attrs):
    return jax.ffi.ffi_call(target, results, vmap_method="sequential")(*args, **attrs)


def _sds(shape):
    return jax.ShapeDtypeStruct(tuple(shape), _F32)


def _value(primal):
    return primal.value


def _zeros_if_symbolic(ct, like):
    if isinstance(ct, SymbolicZero) or ct is None:
        return jnp.zeros(like.shape, like.dtype)
    return ct


def make_ops(suffix: str = ""):
    """`(mlp_core, lstm_core)` calling the FFI targets `metanet_{mlp,lstm}_{fwd,bwd}{suffix}`.
    With the empty suffix (this module's `mlp_core`, `lstm_core`) the targets are the ones
    `_loader` registers from the built library, and a call raises when they are unavailable;
    with another suffix the caller registers them (`jax.ffi.register_ffi_target`)."""
    mlp_fwd, mlp_bwd = f"metanet_mlp_fwd{suffix}", f"metanet_mlp_bwd{suffix}"
    lstm_fwd, lstm_bwd = f"metanet_lstm_fwd{suffix}", f"metanet_lstm_bwd{suffix}"

    def require(*targets):
        if not suffix:
            _require(*targets)

    # ------------------------------------------------------------------------- m (MLP)
    def _mlp_fwd_call(w0, b0, w1, b1, w2, b2, x):
        return _call(mlp_fwd, _sds(x.shape[1:]), w0, b0, w1, b1, w2, b2, x)

    @jax.custom_vjp
    def mlp_core(w0, b0, w1, b1, w2, b2, x):
        """m per coordinate: `w0 [2,H], b0 [H], w1 [H,H], b1 [H], w2 [H], b2 [], x [2,M] ->
        [M]`."""
        require(mlp_fwd, mlp_bwd)
        _check_f32(w0, b0, w1, b1, w2, b2, x)
        return _mlp_fwd_call(w0, b0, w1, b1, w2, b2, x)

    def _mlp_fwd(w0, b0, w1, b1, w2, b2, x):
        args = [_value(a) for a in (w0, b0, w1, b1, w2, b2, x)]
        require(mlp_fwd, mlp_bwd)
        _check_f32(*args)
        # The residual's shape carries whether the features need a cotangent (static in bwd).
        flag = np.zeros((1 if x.perturbed else 0,), np.float32)
        return _mlp_fwd_call(*args), (*args, flag)

    def _mlp_bwd(res, dy):
        *args, flag = res
        x = args[-1]
        dy = _zeros_if_symbolic(dy, jax.ShapeDtypeStruct(x.shape[1:], _F32))
        shapes = [a.shape for a in args]
        outs = _call(mlp_bwd, [_sds(s) for s in shapes], *args, dy, need_dx=bool(flag.shape[0]))
        return tuple(outs)

    mlp_core.defvjp(_mlp_fwd, _mlp_bwd, symbolic_zeros=True)

    # ------------------------------------------------------------------------- d (LSTM)
    def _lstm_fwd_call(wx, wh, b, wo, bo, feats):
        return _call(lstm_fwd, _sds(feats.shape[2:]), wx, wh, b, wo, bo, feats)

    @jax.custom_vjp
    def lstm_core(wx, wh, b, wo, bo, feats):
        """d per coordinate: `wx [2,4H], wh [H,4H], b [4H], wo [H], bo [], feats [T,2,P] ->
        [P]`."""
        require(lstm_fwd, lstm_bwd)
        _check_f32(wx, wh, b, wo, bo, feats)
        return _lstm_fwd_call(wx, wh, b, wo, bo, feats)

    def _lstm_fwd(wx, wh, b, wo, bo, feats):
        args = [_value(a) for a in (wx, wh, b, wo, bo, feats)]
        require(lstm_fwd, lstm_bwd)
        _check_f32(*args)
        flag = np.zeros((1 if feats.perturbed else 0,), np.float32)
        return _lstm_fwd_call(*args), (*args, flag)

    def _lstm_bwd(res, dy):
        *args, flag = res
        feats = args[-1]
        dy = _zeros_if_symbolic(dy, jax.ShapeDtypeStruct(feats.shape[2:], _F32))
        shapes = [a.shape for a in args]
        outs = _call(lstm_bwd, [_sds(s) for s in shapes], *args, dy, need_dfeat=bool(flag.shape[0]))
        return tuple(outs)

    lstm_core.defvjp(_lstm_fwd, _lstm_bwd, symbolic_zeros=True)
    return mlp_core, lstm_core


mlp_core, lstm_core = make_ops()
