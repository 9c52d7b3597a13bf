"""Giving host memory back after heavy requests.

A big image, eight images, half an hour of audio or a long prompt make a server allocate hundreds of MB on
the CPU (decoded pixels, HD crops, log-mels, tower activations, token lists). Freed, that memory mostly
stays in the process, for two reasons:

- glibc's malloc keeps freed chunks in its arenas (one per thread that allocated: the event loop, the
  preprocessing workers, the engine thread). free() gives back only the top of a heap, and a large freed
  chunk raises the mmap threshold, so later large buffers come from the arenas too. `malloc_trim(0)` returns
  the free pages of every arena.
- Objects caught in a reference cycle (an exception whose traceback holds frames that hold a request's
  tensors) wait for Python's oldest-generation collection, which a quiet server may not run for hours.

`IdleReclaimer` runs `gc.collect()` then `malloc_trim(0)` when the engine has been idle for a moment and the
process grew by `growth_bytes` since the last time, so a server goes back to about its warmed-up size after
heavy traffic (docs/reliability.md has the figures). Off glibc (macOS, musl) only the collection runs.
"""
from __future__ import annotations

import ctypes
import gc
import os
import time
from collections.abc import Callable

# How long the engine must have had nothing to do before memory is reclaimed: long enough that a steady
# trickle of requests never pays for a collection, short next to the minute the reliability goal allows.
RECLAIM_IDLE_S = 1.0
PAGE_BYTES = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_bytes() -> int | None:
    """This process's resident set size, or None where /proc is absent (macOS, Windows)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_BYTES
    except (OSError, ValueError, IndexError):
        return None


def _glibc(name: str, argtypes: list) -> Callable[..., int] | None:
    """A glibc function, or None on another C library (musl has no malloc_trim; macOS's malloc differs)."""
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):  # "glibc 2.36"; ValueError or None elsewhere
            return None
        fn = getattr(ctypes.CDLL("libc.so.6"), name)
    except (ValueError, OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = argtypes, ctypes.c_int
    return fn


MALLOC_TRIM = _glibc("malloc_trim", [ctypes.c_size_t])
MALLOPT = _glibc("mallopt", [ctypes.c_int, ctypes.c_int])
M_ARENA_MAX = -8  # mallopt's parameter number (malloc.h)
# Arenas for a server process. glibc makes up to 8 per core, one per thread that allocates while another holds
# an arena; each keeps the free space at the top of its heaps, which malloc_trim does not return. Two measured
# 1.14-1.16x the warmed-up RSS after the soak's heavy phase against 1.29x with glibc's default (the embedded
# micro model, docs/reliability.md), with no throughput loss that the soak could see.
SERVER_MALLOC_ARENAS = 2


def limit_malloc_arenas(arenas: int = SERVER_MALLOC_ARENAS) -> bool:
    """Cap glibc's malloc arenas for the rest of the process (a server calls it before its threads start),
    unless MALLOC_ARENA_MAX is set in the environment: the operator's choice wins. -> whether it was set."""
    if MALLOPT is None or "MALLOC_ARENA_MAX" in os.environ:
        return False
    return MALLOPT(M_ARENA_MAX, arenas) == 1


def freeze_startup_objects() -> None:
    """Collect, then move every object alive now (the model, torch, the web framework: ~365K objects) out of
    the garbage collector's reach for good. A full collection then scans only what requests created: it took
    ~200 ms with them, a pause of every stream (bench/fairness.py saw it as its p99 inter-token gap), and the
    idle release above pays it too. Call it once the server is built, just before it serves."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Collect reference cycles, then hand malloc's free pages back to the system (glibc only)."""
    gc.collect()
    if MALLOC_TRIM is not None:
        MALLOC_TRIM(0)


class IdleReclaimer:
    """Releases memory when the engine has been idle a moment after the process grew: call `idle()` whenever
    the engine has had nothing to do for RECLAIM_IDLE_S, and `working()` after each step. It releases when the
    highest RSS seen since the last release (or since it was made) is `growth_bytes` above what that release
    left. growth_bytes 0: never.

    The highest value, not the current one: a release made between two heavy requests leaves the first one's
    fragments behind, and the second one's buffers, freed, may not raise the RSS much above that again.

    busy: True while work outside the engine is under way (a server decoding an upload, tokenizing a prompt).
    Releasing then would pause that work for the collection (~0.2 s) and count the memory it still holds as
    the new floor."""

    def __init__(self, growth_bytes: int, busy: Callable[[], bool] = lambda: False,
                 release: Callable[[], None] = release_memory):
        self.growth_bytes, self.busy, self.release = growth_bytes, busy, release
        self.baseline = self.peak = rss_bytes()  # what the last release left; the most seen since
        self.releases = 0
        self.released_bytes = 0  # RSS given back by all releases together
        self._seen_at = time.monotonic()

    @property
    def enabled(self) -> bool:
        return self.growth_bytes > 0 and self.baseline is not None

    def working(self) -> None:
        """Note the RSS while the engine works, at most every RECLAIM_IDLE_S (a /proc read: ~20 us)."""
        t = time.monotonic()
        if self.enabled and t - self._seen_at >= RECLAIM_IDLE_S:
            self._seen_at = t
            self.peak = max(self.peak, rss_bytes() or 0)

    def idle(self) -> bool:
        """-> True when it released memory."""
        now = rss_bytes()
        if not self.enabled or now is None:
            return False
        self.peak = max(self.peak, now)
        if self.busy():
            return False
        if self.peak - self.baseline < self.growth_bytes:
            self.baseline = min(self.baseline, now)  # what the process went back to by itself counts too
            return False
        self.release()
        after = rss_bytes() or now
        self.releases += 1
        self.released_bytes += max(now - after, 0)
        self.baseline = self.peak = after
        return True
