"""Builds the fused generator kernels: `python -m metanet_jax.kernels.build [--force]`.

Compiles every `csrc/*.cc` of this package with g++ (`-O3 -march=native`: every machine builds
its own; no `-ffast-math`, which would change the arithmetic) against the XLA FFI headers that
jaxlib ships (`jax.ffi.include_dir()`) into one shared library beside this file,
`_metanet_kernels.so` (git-ignored), written atomically (a running program keeps the library it
loaded). The library records a digest of the sources it was built from; `metanet_jax.kernels`
refuses a library whose digest differs from the sources' (a stale build), so an edited kernel is
never run unbuilt. `make kernels` runs this; `make install` (so `make test`, `make demo`, `make
bench`) depends on it and reruns it when a source changes. Nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from metanet_jax.kernels._paths import LIBRARY, SOURCE_DIR, source_digest, sources

CXX = os.environ.get("CXX", "g++")
FLAGS = ["-O3", "-march=native", "-std=c++20", "-shared", "-fPIC"]


def command(output: Path) -> list[str]:
    """The compiler command that builds the library into `output`."""
    import jax  # only here: importing the package must not need jax's headers

    digest = source_digest()
    return [
        CXX,
        *FLAGS,
        f"-I{jax.ffi.include_dir()}",
        f"-I{SOURCE_DIR}",
        f'-DMETANET_SOURCE_DIGEST="{digest}"',
        *[str(s) for s in sources() if s.suffix == ".cc"],
        "-o",
        str(output),
    ]


def build(force: bool = False, verbose: bool = True) -> Path:
    """Builds the library unless it is up to date (its recorded digest is the sources');
    returns its path. Raises `RuntimeError` with the compiler's output when it fails."""
    from metanet_jax.kernels._loader import library_digest

    if not force and LIBRARY.exists() and library_digest(LIBRARY) == source_digest():
        if verbose:
            print(f"{LIBRARY.name} is up to date")
        return LIBRARY
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=LIBRARY.parent)
    os.close(fd)
    cmd = command(Path(tmp))
    if verbose:
        print(shlex.join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"building {LIBRARY.name} failed ({CXX} exit {result.returncode}):\n"
                f"{result.stderr}{result.stdout}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, LIBRARY)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if verbose:
        print(f"built {LIBRARY}")
    return LIBRARY


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    args = parser.parse_args(argv)
    try:
        build(force=args.force)
    except (RuntimeError, OSError) as e:
        print(f"metanet_jax.kernels.build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
