"""metanet_jax.kernels: availability and its reasons, the build's source digest, lazy loading,
and `MetaNetConfig.generator_kernel` (validation, resolution, errors, saved configurations,
the training program's flag)."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys

import pytest

import metanet_jax as mn
from metanet_jax import checkpointing, kernels
from metanet_jax.kernels import _loader, _paths, build


def test_built_from_the_present_sources():
    """`make test` builds the kernels: they are available, and the library records the
    digest of the sources beside it."""
    assert kernels.fused_available(), kernels.unavailable_reason()
    assert kernels.unavailable_reason() is None
    assert _loader.library_digest(_paths.LIBRARY) == _paths.source_digest()
    cmd = build.command(_paths.LIBRARY)
    assert "-O3" in cmd and not any("fast-math" in c for c in cmd)
    assert all(f in cmd for f in build.target_flags())
    assert build.library_target_flags(_paths.LIBRARY) == shlex.join(build.target_flags())
    assert {p.name for p in _paths.sources()} >= {"kernels.h", "mlp.cc", "lstm.cc", "digest.cc"}


def test_target_flags_default_and_overrides(monkeypatch):
    """-march=native unless $METANET_KERNEL_CFLAGS or --march says otherwise (the portable
    paths are built and checked in test_targets.py)."""
    monkeypatch.delenv(build.TARGET_FLAGS_ENV, raising=False)
    assert build.target_flags() == ["-march=native"]
    monkeypatch.setenv(build.TARGET_FLAGS_ENV, " ")
    assert build.target_flags() == ["-march=native"]
    monkeypatch.setenv(build.TARGET_FLAGS_ENV, "-march=x86-64-v3 -mtune=generic")
    assert build.target_flags() == ["-march=x86-64-v3", "-mtune=generic"]
    assert build.target_flags("x86-64") == ["-march=x86-64"]
    cmd = build.command(_paths.LIBRARY)
    assert "-march=x86-64-v3" in cmd and "-march=native" not in cmd
    assert '-DMETANET_TARGET_FLAGS="-march=x86-64-v3 -mtune=generic"' in cmd


def test_importing_the_package_loads_nothing():
    code = (
        "import sys, metanet_jax, metanet_jax.kernels as k; "
        "assert k._loader.load.cache_info().currsize == 0; "
        "assert 'metanet_jax.kernels._ops' not in sys.modules; print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip() == "ok", out.stderr


@pytest.fixture
def missing_library(monkeypatch, tmp_path):
    """The kernels as on a machine where they were never built."""
    monkeypatch.setattr(_loader, "LIBRARY", tmp_path / "_metanet_kernels.so")
    _loader.load.cache_clear()
    yield
    _loader.load.cache_clear()


def test_unbuilt_or_stale_library_is_unavailable_with_the_reason(missing_library, tmp_path):
    assert not kernels.fused_available()
    reason = kernels.unavailable_reason()
    assert "not built" in reason and "make kernels" in reason
    assert "python -m metanet_jax.kernels.build" in reason
    # A library that records no digest, or another one, is refused.
    _loader.LIBRARY.write_bytes(b"not a shared object")
    _loader.load.cache_clear()
    assert not kernels.fused_available()
    assert "other sources" in kernels.unavailable_reason()


def test_the_config_field_is_validated():
    assert mn.MetaNetConfig().generator_kernel == "auto"
    with pytest.raises(ValueError, match="generator_kernel='fast' is unknown"):
        mn.MetaNetConfig(generator_kernel="fast")


def test_auto_picks_fused_for_float32_on_cpu_and_xla_otherwise():
    config = mn.MetaNetConfig()
    assert config.resolved_generator_kernel("cpu") == "fused"
    assert config.resolved_generator_kernel("gpu") == "xla"
    assert config.resolved_generator_kernel("tpu") == "xla"
    for dtype in ("float64", "bfloat16"):
        assert config.replace(compute_dtype=dtype).resolved_generator_kernel("cpu") == "xla"
    assert config.replace(generator_kernel="xla").resolved_generator_kernel("cpu") == "xla"
    assert config.replace(generator_kernel="fused").resolved_generator_kernel("cpu") == "fused"
    assert kernels.describe(config, "cpu").startswith("generator kernel: fused")
    assert kernels.describe(config, "gpu") == (
        "generator kernel: xla (auto: the fused kernels run on the CPU only (backend 'gpu'))"
    )
    assert kernels.describe(config.replace(generator_kernel="xla")) == (
        "generator kernel: xla (asked for)"
    )


def test_fused_where_it_cannot_run_is_an_error_naming_why(missing_library):
    fused = mn.MetaNetConfig(generator_kernel="fused")
    with pytest.raises(ValueError, match="the CPU only"):
        fused.resolved_generator_kernel("gpu")
    with pytest.raises(ValueError, match="float32 only"):
        fused.replace(compute_dtype="float64").resolved_generator_kernel("cpu")
    with pytest.raises(ValueError, match=r"not built; run `make kernels`"):
        fused.resolved_generator_kernel("cpu")
    with pytest.raises(ValueError, match="not built"):
        kernels.describe(fused, "cpu")
    auto = mn.MetaNetConfig()
    assert auto.resolved_generator_kernel("cpu") == "xla"
    assert "not built" in kernels.describe(auto, "cpu")


def test_saved_configurations_load():
    """A configuration saved before the field loads ("auto"); one saved with "fused" loads as
    "auto" (an execution choice: it must load where the kernels cannot run)."""
    saved = checkpointing.config_to_dict(mn.MetaNetConfig(generator_kernel="fused"))
    assert checkpointing.config_from_dict(saved).generator_kernel == "auto"
    del saved["generator_kernel"]
    assert checkpointing.config_from_dict(saved).generator_kernel == "auto"
    saved["generator_kernel"] = "xla"
    assert checkpointing.config_from_dict(saved).generator_kernel == "xla"
    assert "generator_kernel" in {f.name for f in dataclasses.fields(mn.MetaNetConfig)}


def test_training_flag_and_resume():
    from experiments import train

    assert "generator_kernel" in train.MODEL_FLAGS
    assert "generator_kernel" in train.MUTABLE_FIELDS
