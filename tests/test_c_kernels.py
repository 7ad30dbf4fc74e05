"""C kernels built on first use: cached per source, compiler and CPU, written whole, and refused
with a logged reason (the torch-op path runs instead) where the compiler fails."""

from __future__ import annotations

import logging

import pytest

from fxquant.kernels import c_kernels


@pytest.fixture
def kernel_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FXQUANT_KERNEL_CACHE", str(tmp_path))
    return tmp_path


@pytest.mark.skipif(c_kernels.compiler() is None, reason="no C compiler on this machine")
def test_a_kernel_is_built_once_into_the_cache_and_loads(kernel_cache):
    lib = c_kernels.load.__wrapped__("large_codes")
    assert lib is not None and hasattr(lib, "fxq_add_large_codes")
    built = sorted(p.name for p in kernel_cache.iterdir())
    assert len(built) == 1 and built[0].startswith("large_codes-") and built[0].endswith(".so")
    mtime = (kernel_cache / built[0]).stat().st_mtime_ns
    assert c_kernels.load.__wrapped__("large_codes") is not None
    assert [p.name for p in kernel_cache.iterdir()] == built  # reused, no temporaries left
    assert (kernel_cache / built[0]).stat().st_mtime_ns == mtime


def test_a_failing_compiler_gives_none_and_says_why(kernel_cache, monkeypatch, caplog):
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    with caplog.at_level(logging.WARNING, logger="fxquant.kernels.c_kernels"):
        assert c_kernels.load.__wrapped__("large_codes") is None
    assert "could not build the C kernel large_codes" in caplog.text
    assert list(kernel_cache.iterdir()) == []  # nothing half-written


def test_no_compiler_gives_none(kernel_cache, monkeypatch):
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(kernel_cache))
    assert c_kernels.compiler() is None
    assert c_kernels.load.__wrapped__("large_codes") is None


def test_flags_follow_the_capability_aten_dispatches_to(monkeypatch):
    monkeypatch.setattr(c_kernels.platform, "machine", lambda: "x86_64")
    for capability, cap in (("AVX512", ()), ("AVX2", ("-mno-avx512f",)), ("DEFAULT", ("-mno-avx",))):
        monkeypatch.setattr(c_kernels.torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert c_kernels.flags() == c_kernels.FLAGS + cap
    monkeypatch.setattr(c_kernels.platform, "machine", lambda: "aarch64")
    assert c_kernels.flags() == c_kernels.FLAGS
