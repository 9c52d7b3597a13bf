"""When the engine gives memory back (engine/memory.py) and how much its media cache may hold."""
from __future__ import annotations

import platform
import sys

import pytest
import torch

import phi4mm
from phi4mm.engine import memory
from phi4mm.engine.engine import Engine
from phi4mm.engine.memory import IdleReclaimer

MIB = 1 << 20


class FakeRss:
    """Stands in for /proc: `mib` is what rss_bytes() reports; a release brings it down to `floor`."""

    def __init__(self, mib: int, floor: int):
        self.mib, self.floor, self.releases = mib, floor, 0

    def read(self) -> int:
        return self.mib * MIB

    def release(self) -> None:
        self.releases += 1
        self.mib = self.floor


@pytest.fixture
def rss(monkeypatch):
    fake = FakeRss(1000, 1000)
    monkeypatch.setattr(memory, "rss_bytes", fake.read)
    return fake


def test_memory_is_released_when_idle_after_growth_only(rss):
    busy = [False]
    rec = IdleReclaimer(64 * MIB, busy=lambda: busy[0], release=rss.release)
    assert not rec.idle() and rss.releases == 0  # no growth yet
    rss.mib = 1050
    assert not rec.idle()  # 50 MiB: below the threshold
    rss.mib, busy[0] = 1600, True
    assert not rec.idle() and rss.releases == 0  # a request is being prepared: not now
    busy[0] = False
    assert rec.idle() and rss.releases == 1 and rec.released_bytes == 600 * MIB
    assert not rec.idle()  # back at the floor: nothing more to do
    rss.mib, rss.floor = 1400, 1300  # memory the process keeps (a cache grew) becomes the new floor
    assert rec.idle() and rec.baseline == 1300 * MIB
    rss.mib = 1350
    assert not rec.idle() and rss.releases == 2


def test_the_highest_rss_since_the_last_release_counts(rss, monkeypatch):
    """A heavy request seen while the engine worked is released after, though the RSS fell back by itself to
    less than the threshold above the floor."""
    monkeypatch.setattr(memory, "RECLAIM_IDLE_S", 0.0)  # working() samples at every call
    rec = IdleReclaimer(64 * MIB, release=rss.release)
    rss.mib = 1500
    rec.working()
    rss.mib = 1040  # freed, but its fragments stay until a release
    assert rec.idle() and rss.releases == 1 and rss.mib == 1000


def test_a_zero_threshold_never_releases(rss):
    rec = IdleReclaimer(0, release=rss.release)
    rss.mib = 5000
    assert not rec.enabled and not rec.idle() and rss.releases == 0


def test_release_memory_runs_on_this_platform():
    memory.release_memory()  # gc.collect, and malloc_trim where glibc has it: never raises
    if sys.platform == "linux" and platform.libc_ver()[0] == "glibc":
        assert memory.MALLOC_TRIM is not None


def test_the_media_cache_is_bounded_by_bytes(tiny_official):
    eng = Engine(phi4mm.load(tiny_official, dtype=torch.float32), num_blocks=64, media_cache_items=8,
                 media_cache_bytes=3 * MIB)
    runner = eng.runner
    one_mib = torch.zeros(MIB // 4)  # float32
    for k in range(4):
        runner.cache_media(bytes([k]), (one_mib, None))
    assert list(runner.media_cache) == [b"\x01", b"\x02", b"\x03"] and runner.media_cached_bytes == 3 * MIB
    runner.cache_media(b"big", (torch.zeros(MIB), None))  # 4 MiB: more than the whole cache holds
    assert b"big" not in runner.media_cache and runner.media_cached_bytes == 3 * MIB
    runner.cache_media(b"two", (one_mib, one_mib))  # image and audio: 2 MiB
    assert list(runner.media_cache) == [b"\x03", b"two"] and runner.media_cached_bytes == 3 * MIB
