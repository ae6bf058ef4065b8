"""Where the kernels' sources and library live, and the digest that ties them together."""

from __future__ import annotations

import hashlib
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_DIR = PACKAGE_DIR / "csrc"
LIBRARY = PACKAGE_DIR / "_metanet_kernels.so"


def sources() -> list[Path]:
    """The C++ sources and headers, sorted by name."""
    if not SOURCE_DIR.is_dir():
        return []
    return sorted(p for p in SOURCE_DIR.iterdir() if p.suffix in (".cc", ".h"))


def source_digest() -> str:
    """SHA-256 (first 16 hex digits) over the sources' names and contents."""
    h = hashlib.sha256()
    for path in sources():
        h.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]
