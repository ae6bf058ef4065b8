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


def _zeros_if_symbolic(ct, like):
    if isinstance(ct, SymbolicZero) or ct is None:
        return jnp.zeros(like.shape, like.dtype)
    return ct


def _fused_op(name: str, suffix: str, need_attr: str, lead: int, doc: str):
    """A `jax.custom_vjp` over the FFI targets `metanet_<name>_{fwd,bwd}<suffix>`: its last
    argument is the features (`[*lead axes, coordinates]`), its output one value per
    coordinate; the backward gives the cotangent of every argument (`need_attr` tells the
    kernel whether the features need theirs)."""
    fwd_target, bwd_target = f"metanet_{name}_fwd{suffix}", f"metanet_{name}_bwd{suffix}"

    def checked(args):
        if not suffix:
            _require(fwd_target, bwd_target)
        _check_f32(*args)
        return _call(fwd_target, _sds(args[-1].shape[lead:]), *args)

    @jax.custom_vjp
    def op(*args):
        return checked(args)

    def fwd(*primals):
        args = [p.value for p in primals]
        # The residual's shape carries whether the features need a cotangent (static in bwd).
        flag = np.zeros((1 if primals[-1].perturbed else 0,), np.float32)
        return checked(args), (*args, flag)

    def bwd(res, dy):
        *args, flag = res
        dy = _zeros_if_symbolic(dy, jax.ShapeDtypeStruct(args[-1].shape[lead:], _F32))
        results = [_sds(a.shape) for a in args]
        return tuple(_call(bwd_target, results, *args, dy, **{need_attr: bool(flag.shape[0])}))

    op.defvjp(fwd, bwd, symbolic_zeros=True)
    op.__name__ = op.__qualname__ = f"{name}_core"
    op.__doc__ = doc
    return op


def make_ops(suffix: str = ""):
    """`(mlp_core, lstm_core)` calling the FFI targets `metanet_{mlp,lstm}_{fwd,bwd}{suffix}`.
    With the empty suffix (this module's `mlp_core`, `lstm_core`) the targets are the ones
    `_loader` registers from the built library, and a call raises when they are unavailable;
    with another suffix the caller registers them (`jax.ffi.register_ffi_target`)."""
    mlp = _fused_op(
        "mlp", suffix, "need_dx", 1,
        "m per coordinate: `w0 [2,H], b0 [H], w1 [H,H], b1 [H], w2 [H], b2 [], x [2,M] -> [M]`.",
    )  # fmt: skip
    lstm = _fused_op(
        "lstm", suffix, "need_dfeat", 2,
        "d per coordinate: `wx [2,4H], wh [H,4H], b [4H], wo [H], bo [], feats [T,2,P] -> [P]`.",
    )  # fmt: skip
    return mlp, lstm


mlp_core, lstm_core = make_ops()
