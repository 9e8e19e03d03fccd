"""Freed heap memory goes back to the OS after connections leave."""

from __future__ import annotations

import ctypes.util

import pytest

from pushsvc import heaptrim


@pytest.mark.skipif("libc.so" not in (ctypes.util.find_library("c") or ""), reason="glibc only")
def test_trim_returns_freed_memory_to_the_os() -> None:
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    # Many small objects (the shape of per-connection state), then free them
    # all but a few scattered survivors that pin glibc's heap top.
    blocks = [bytearray(1000) for _ in range(100_000)]
    keep = blocks[::5000]
    del blocks
    before = rss_kib()
    assert heaptrim.trim() is True
    after = rss_kib()
    assert after < before - 10_000, (before, after)  # at least ~10 MiB of the ~100 given back
    assert keep


def test_trimmer_is_a_timer_service() -> None:
    service = heaptrim.trimmer(60)
    assert service.step == 60 and service.call[0] is heaptrim.trim
