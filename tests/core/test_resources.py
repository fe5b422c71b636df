"""release_free_heap hands freed C-heap blocks back to the OS (glibc's malloc_trim)."""

import ctypes

import pytest

from rankfold.core.resources import _malloc_trim, release_free_heap


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        return int(status.read().split("VmRSS:")[1].split()[0]) / 1024


@pytest.mark.skipif(_malloc_trim() is None, reason="the C library has no malloc_trim (not glibc)")
def test_freed_small_blocks_leave_the_resident_set_once_released():
    libc = ctypes.CDLL(None)
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    block, count = 64 << 10, 2048  # 128 MiB in blocks below the mmap threshold: on the heap
    blocks = [libc.malloc(block) for _ in range(count)]
    for address in blocks:
        ctypes.memset(address, 1, block)  # touched: resident
    keep = libc.malloc(block)  # allocated last, above them: free() alone cannot shrink the heap's top
    ctypes.memset(keep, 1, block)
    for address in blocks:
        libc.free(address)
    before = _rss_mb()
    assert release_free_heap()
    after = _rss_mb()
    libc.free(keep)
    assert before - after > 64, f"RSS {before:.0f} MiB -> {after:.0f} MiB"
