"""Loads the kernels' library (ctypes) and registers its FFI targets with XLA, once, lazily.

Importing `metanet_jax` or `metanet_jax.kernels` compiles and loads nothing; the first question
(`fused_available()`) or use of an op does. A missing library, one built from other sources
than the present ones, or one that fails to load makes the kernels unavailable, with the reason
(`unavailable_reason()`), never an import error.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

from metanet_jax.kernels._paths import LIBRARY, source_digest

BUILD_HINT = "run `make kernels` (or `python -m metanet_jax.kernels.build`)"

# FFI target name -> C symbol.
TARGETS = {
    "metanet_mlp_fwd": "MetanetMlpFwd",
    "metanet_mlp_bwd": "MetanetMlpBwd",
    "metanet_lstm_fwd": "MetanetLstmFwd",
    "metanet_lstm_bwd": "MetanetLstmBwd",
}


def library_digest(path: Path) -> str | None:
    """The source digest a built library records, or `None` when it records none."""
    try:
        lib = ctypes.CDLL(str(path))
        fn = lib.MetanetSourceDigest
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


@functools.cache
def load() -> tuple[frozenset[str], str | None]:
    """Loads and registers the library once: `(registered targets, reason)`, the reason
    saying why some target is unavailable (`None` when all are registered)."""
    if not LIBRARY.exists():
        return frozenset(), f"the kernel library {LIBRARY} is not built; {BUILD_HINT}"
    digest = library_digest(LIBRARY)
    expected = source_digest()
    if digest != expected:
        return frozenset(), (
            f"the kernel library {LIBRARY} was built from other sources (digest {digest}, "
            f"sources {expected}); {BUILD_HINT}"
        )
    try:
        lib = ctypes.CDLL(str(LIBRARY))
    except OSError as e:
        return frozenset(), f"the kernel library {LIBRARY} does not load ({e}); {BUILD_HINT}"
    import jax

    registered, missing = set(), []
    for target, symbol in TARGETS.items():
        fn = getattr(lib, symbol, None)
        if fn is None:
            missing.append(symbol)
            continue
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(fn), platform="cpu")
        registered.add(target)
    reason = None
    if missing:
        reason = f"the kernel library {LIBRARY} lacks {', '.join(missing)}; {BUILD_HINT}"
    return frozenset(registered), reason
