"""Fused fast-weight generators for the CPU (XLA FFI custom calls written in C++, `csrc/`).

`fused_available()` says whether the kernels are built (and built from the present sources);
`unavailable_reason()` says why not, and how to build them (`make kernels`, or
`python -m metanet_jax.kernels.build`). Nothing is compiled or loaded at import.
`MetaNetConfig.generator_kernel` chooses between these kernels and the XLA path of
`metanet_jax.model.generators` (the reference, and the path on accelerators).

The ops, `mlp_core` (m) and `lstm_core` (d), are float32 `jax.custom_vjp`s (`_ops.py`).
"""

from __future__ import annotations

from metanet_jax.kernels._loader import BUILD_HINT


def fused_available() -> bool:
    """Whether the fused kernels (m and d, forward and backward) are built and registered."""
    from metanet_jax.kernels import _loader

    registered, _ = _loader.load()
    return set(_loader.TARGETS) <= registered


def unavailable_reason() -> str | None:
    """Why the fused kernels cannot run (with how to build them), or `None` when they can."""
    from metanet_jax.kernels import _loader

    return _loader.load()[1]


def describe(config, backend: str | None = None) -> str:
    """One line for a program's start-up output: which code computes m and d for `config`
    (a `MetaNetConfig`) and, when "auto" falls back to XLA, why. Raises `ValueError` (naming
    why and how to build the kernels) when "fused" is asked for where it cannot run."""
    kernel = config.resolved_generator_kernel(backend)
    if kernel == "fused":
        return f"generator kernel: fused (C++ kernels, CPU float32; {config.generator_kernel})"
    if config.generator_kernel == "xla":
        return "generator kernel: xla (asked for)"
    return f"generator kernel: xla (auto: {config.fused_generator_unavailable(backend)})"


def __getattr__(name):
    if name in ("mlp_core", "lstm_core"):
        from metanet_jax.kernels import _ops

        return getattr(_ops, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "BUILD_HINT",
    "describe",
    "fused_available",
    "lstm_core",
    "mlp_core",
    "unavailable_reason",
]
