"""Builds the fused generator kernels: `python -m metanet_jax.kernels.build [--force]
[--march=ARCH] [--output=PATH]`.

Compiles every `csrc/*.cc` of this package with g++ (`-O3 -march=native`: every machine builds
its own; no `-ffast-math`, which would change the arithmetic) against the XLA FFI headers that
jaxlib ships (`jax.ffi.include_dir()`) into one shared library beside this file,
`_metanet_kernels.so` (git-ignored), written atomically (a running program keeps the library it
loaded). The library records a digest of the sources it was built from; `metanet_jax.kernels`
refuses a library whose digest differs from the sources' (a stale build), so an edited kernel is
never run unbuilt. `make kernels` runs this; `make install` (so `make test`, `make demo`, `make
bench`) depends on it and reruns it when a source changes. Nothing is downloaded.

The kernels take the vector width of the target (csrc/lstm.cc: AVX-512, AVX, else 128-bit
vectors: SSE2, NEON), so they build on any machine g++ targets. The target flags (by default
`-march=native`) can be overridden: `--march=ARCH` (e.g. `--march=x86-64-v3`: AVX2 without
AVX-512, `--march=x86-64`: SSE2 only), or the environment variable `METANET_KERNEL_CFLAGS`
(shell words replacing `-march=native`, e.g. `-mcpu=native` where g++ has no `-march=native`);
`--march` wins over the variable. The library records its target flags too, and a build whose
flags differ from the recorded ones rebuilds it (`make` reruns the build only when a source
changes: after changing the flags, run this module). `--output` builds elsewhere (the tests
build other targets into a temporary folder); the package loads only `_metanet_kernels.so`.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path

from metanet_jax.kernels._paths import LIBRARY, SOURCE_DIR, source_digest, sources

CXX = os.environ.get("CXX", "g++")
FLAGS = ["-O3", "-std=c++20", "-shared", "-fPIC"]
DEFAULT_TARGET_FLAGS = ["-march=native"]
TARGET_FLAGS_ENV = "METANET_KERNEL_CFLAGS"


def target_flags(march: str | None = None) -> list[str]:
    """`-march=<march>` when given, else the words of `$METANET_KERNEL_CFLAGS` when set (and
    not blank), else `-march=native`."""
    if march:
        return [f"-march={march}"]
    env = shlex.split(os.environ.get(TARGET_FLAGS_ENV, ""))
    return env or list(DEFAULT_TARGET_FLAGS)


def command(output: Path, flags: list[str] | None = None) -> list[str]:
    """The compiler command that builds the library into `output` with the target flags
    `flags` (default: `target_flags()`)."""
    import jax  # only here: importing the package must not need jax's headers

    flags = target_flags() if flags is None else list(flags)
    digest = source_digest()
    return [
        CXX,
        *FLAGS,
        *flags,
        f"-I{jax.ffi.include_dir()}",
        f"-I{SOURCE_DIR}",
        f'-DMETANET_SOURCE_DIGEST="{digest}"',
        f"-DMETANET_TARGET_FLAGS={_c_string(shlex.join(flags))}",
        *[str(s) for s in sources() if s.suffix == ".cc"],
        "-o",
        str(output),
    ]


def _c_string(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def library_target_flags(path: Path) -> str | None:
    """The target flags a built library records (`shlex.join`ed), or `None`."""
    try:
        fn = ctypes.CDLL(str(path)).MetanetTargetFlags
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_char_p
    return fn().decode()


def build(
    force: bool = False,
    verbose: bool = True,
    flags: list[str] | None = None,
    output: Path | None = None,
) -> Path:
    """Builds the library (into `output`, default `LIBRARY`) with the target flags `flags`
    (default: `target_flags()`) unless it is up to date (it records the sources' digest and
    these flags); returns its path. Raises `RuntimeError` with the compiler's output when it
    fails."""
    from metanet_jax.kernels._loader import library_digest

    flags = target_flags() if flags is None else list(flags)
    output = LIBRARY if output is None else Path(output)
    if (
        not force
        and output.exists()
        and library_digest(output) == source_digest()
        and library_target_flags(output) == shlex.join(flags)
    ):
        if verbose:
            print(f"{output.name} is up to date")
        return output
    fd, tmp = tempfile.mkstemp(suffix=".so", prefix=".build-", dir=output.parent)
    os.close(fd)
    cmd = command(Path(tmp), flags)
    if verbose:
        print(shlex.join(cmd))
    try:
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(
                f"building {output.name} failed ({CXX} exit {result.returncode}):\n"
                f"{result.stderr}{result.stdout}"
            )
        os.chmod(tmp, 0o755)
        os.replace(tmp, output)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    if verbose:
        print(f"built {output} ({shlex.join(flags)})")
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="rebuild even when up to date")
    parser.add_argument(
        "--march",
        help=f"build for -march=MARCH instead of ${TARGET_FLAGS_ENV} or -march=native",
    )
    parser.add_argument("--output", type=Path, help=f"where to build (default: {LIBRARY})")
    args = parser.parse_args(argv)
    try:
        build(force=args.force, flags=target_flags(args.march), output=args.output)
    except (RuntimeError, OSError) as e:
        print(f"metanet_jax.kernels.build: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
