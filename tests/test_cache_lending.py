"""Zero-copy results of a cache (fastkd.cache.maps lending maps) and the page checks behind them
(fastkd.cache.pages): rows are lent out of the same map again only when every earlier result over
them is gone and wrote nothing; a streaming pass is checked with one or two page scans, and
after the first check from the page tables alone (userfaultfd write protection); every kind of
write, by the program or by the kernel, is seen.
"""
import os

import numpy as np
import pytest
import torch

from fastkd.cache import LogitCache, write_cache
from fastkd.cache import maps, pages

ROWS, WIDTH, SLICE = 256, 4096, 32   # fp16: 8 KiB rows, 256 KiB slices (zero-copy views)


@pytest.fixture(scope="module")
def wide_cache(tmp_path_factory):
    """A one-shard cache of ``ROWS`` rows of width ``WIDTH`` and those rows."""
    directory = tmp_path_factory.mktemp("wide") / "cache"
    torch.manual_seed(0)
    write_cache(torch.nn.Linear(8, WIDTH), torch.utils.data.TensorDataset(torch.randn(ROWS, 8)),
                directory, batch_size=64, progress=False)
    return directory, LogitCache(directory)[:].clone()


def _unwritten(address: int, num_bytes: int) -> bool:
    """No page of ``[address, address + num_bytes)`` written (False where that cannot be told)."""
    return pages.written_pages(address, num_bytes) == []


def _page_scan_works(directory) -> bool:
    """Whether this kernel tells written pages of a private file map (PAGEMAP_SCAN)."""
    path = directory / "page-scan-probe"
    path.write_bytes(bytes(8192))
    data = torch.from_file(str(path), shared=False, size=8192, dtype=torch.uint8).numpy()
    assert int(data.sum()) == 0   # both pages read in: present file pages
    return _unwritten(data.ctypes.data, 8192)


@pytest.fixture
def page_scan(tmp_path):
    if not _page_scan_works(tmp_path):   # elsewhere every read maps anew (test_cache_hostile)
        pytest.skip("needs Linux's PAGEMAP_SCAN (6.7+)")


def _read_file_map(directory, num_pages: int) -> np.ndarray:
    """A private map of a new file of ``num_pages`` pages (bytes 0..255 repeated), every page
    read in."""
    path = directory / "blob"
    path.write_bytes(bytes(range(256)) * 16 * num_pages)
    data = torch.from_file(str(path), shared=False, size=4096 * num_pages,
                           dtype=torch.uint8).numpy()
    assert int(data.sum()) == 16 * num_pages * sum(range(256))
    return data


def _watched_file_map(directory, num_pages: int) -> np.ndarray:
    data = _read_file_map(directory, num_pages)
    protected = pages.watch(data.ctypes.data, data.nbytes)
    if not protected:
        pytest.skip("userfaultfd write protection is not allowed here")
    assert protected == [(data.ctypes.data, data.ctypes.data + data.nbytes)]
    return data


def _offsets(ranges, data: np.ndarray) -> list:
    return [(start - data.ctypes.data, end - data.ctypes.data) for start, end in ranges]


class _Counts:
    """Calls of the page checks, and lending maps made, counted through monkeypatch."""

    def __init__(self, monkeypatch):
        self.calls = {"written_pages": 0, "unprotected_pages": 0, "watch": 0, "maps": 0}
        for name in ("written_pages", "unprotected_pages", "watch"):
            monkeypatch.setattr(pages, name, self._counting(name, getattr(pages, name)))
        monkeypatch.setattr(maps.MappedArray, "_new_lending_map",
                            self._counting("maps", maps.MappedArray._new_lending_map))

    def _counting(self, name, function):
        def counted(*args):
            self.calls[name] += 1
            return function(*args)
        return counted

    def take(self) -> dict:
        """The counts since the last take."""
        counts, self.calls = self.calls, dict.fromkeys(self.calls, 0)
        return counts


def _streaming_pass(cache, expected) -> None:
    """Every row once in slices, each slice alive until the next one is read (as a loop
    holding ``batch`` does)."""
    batch = None
    for start in range(0, ROWS, SLICE):
        batch = cache[start:start + SLICE]
        assert torch.equal(batch, expected[start:start + SLICE])


# ----------------------------------------------------------------------------- page checks
def test_unwritten_page_check(tmp_path, page_scan):
    """pages.written_pages: a private file map's pages read as unwritten until a byte of them
    is written (copy-on-write makes the page anonymous)."""
    data = _read_file_map(tmp_path, 4)
    address = data.ctypes.data
    assert _unwritten(address, 16384)
    data[5000] = 1   # page 1
    assert _offsets(pages.written_pages(address, 16384), data) == [(4096, 8192)]
    assert not _unwritten(address + 4096, 10)
    assert _unwritten(address, 4096) and _unwritten(address + 8192, 8192)


def test_watched_pages_report_every_kind_of_write(tmp_path, page_scan):
    """pages.unprotected_pages after pages.watch: no page until written; then exactly the
    written pages, whether numpy, torch or the kernel (a read() into the memory) wrote them,
    as pages.written_pages says too. The pages stay mapped (reading them faults nothing in)."""
    data = _watched_file_map(tmp_path, 16)
    address = data.ctypes.data
    assert pages.unprotected_pages(address, data.nbytes) == []
    assert int(data.sum()) == 16 * 16 * sum(range(256))   # reads change nothing
    assert pages.unprotected_pages(address, data.nbytes) == []
    data[3 * 4096 + 7] = 1
    torch.from_numpy(data)[9 * 4096:9 * 4096 + 3].add_(1)
    with open(__file__, "rb") as source:   # the kernel writes into page 12
        assert source.readinto(memoryview(data[12 * 4096 + 100:12 * 4096 + 200])) == 100
    written = [(3 * 4096, 4 * 4096), (9 * 4096, 10 * 4096), (12 * 4096, 13 * 4096)]
    assert _offsets(pages.unprotected_pages(address, data.nbytes), data) == written
    assert _offsets(pages.written_pages(address, data.nbytes), data) == written


def test_watch_protects_only_clean_pages_that_were_read(tmp_path, page_scan):
    """A written page keeps its mark (watching never hides a write) and a page never read is
    not watched: neither is reported as protected."""
    data = _read_file_map(tmp_path, 8)
    address = data.ctypes.data
    data[2 * 4096] = 9   # written before the watch
    unread = torch.from_file(str(tmp_path / "blob"), shared=False, size=8 * 4096,
                             dtype=torch.uint8).numpy()
    unread[0] = 1   # only page 0 of this second map is present
    protected = pages.watch(address, data.nbytes)
    if not protected:
        pytest.skip("userfaultfd write protection is not allowed here")
    assert _offsets(protected, data) == [(0, 2 * 4096), (3 * 4096, 8 * 4096)]
    assert _offsets(pages.unprotected_pages(address, data.nbytes), data) == [(2 * 4096, 3 * 4096)]
    assert pages.watch(unread.ctypes.data, unread.nbytes) == []   # page 0 written, rest unread


def test_forked_child_does_not_trust_its_parents_watch(tmp_path, page_scan):
    """A forked child does not inherit the write protection: its check says it cannot tell
    (and the parent's watch is unchanged)."""
    data = _watched_file_map(tmp_path, 4)
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:   # pragma: no cover (the child's result goes through the pipe)
        verdict = pages.unprotected_pages(data.ctypes.data, data.nbytes) is None \
            and pages.written_pages(data.ctypes.data, data.nbytes) == []
        os.write(writer, b"1" if verdict else b"0")
        os._exit(0)
    os.close(writer)
    assert os.read(reader, 1) == b"1"
    os.waitpid(child, 0)
    os.close(reader)
    assert pages.unprotected_pages(data.ctypes.data, data.nbytes) == []


# ----------------------------------------------------------------------------- lending maps
def test_rows_are_lent_again_only_when_no_result_uses_or_wrote_them(wide_cache, monkeypatch,
                                                                   page_scan):
    """Zero-copy results share one lending map while their rows are disjoint or the earlier
    results are gone unwritten (a streaming read maps each file once); a live result over the
    same rows, or one that wrote into them, makes the next read map the file anew."""
    directory, expected = wide_cache
    cache = LogitCache(directory)
    cache[:]   # the lending map is made here; the result is gone at once
    counts = _Counts(monkeypatch)
    for _ in range(3):   # a streaming pass, three times: results dropped unwritten
        for start in range(0, ROWS, SLICE):
            assert torch.equal(cache[start:start + SLICE], expected[start:start + SLICE])
    assert counts.take()["maps"] == 0
    held = cache[0:32]
    neighbour = cache[32:64]   # disjoint rows: same map
    assert counts.take()["maps"] == 0
    held.mul_(-1)
    assert torch.equal(neighbour, expected[32:64])
    again = cache[0:32]   # `held` is alive: a new map
    assert counts.take()["maps"] == 1 and torch.equal(again, expected[0:32])
    del held, neighbour, again
    written = cache[0:32]
    written.numpy()[:] = 9   # written, then dropped
    del written
    assert torch.equal(cache[0:32], expected[0:32])
    assert counts.take()["maps"] == 1   # the written pages were seen: a new map
    assert torch.equal(cache[32:64], expected[32:64]) and counts.take()["maps"] == 0


def test_streaming_passes_are_checked_in_one_scan_then_from_the_page_tables(wide_cache,
                                                                           monkeypatch, page_scan):
    """The first pass checks nothing; the second checks the first pass's results in one or two
    scans (not one per result) and watches their pages; from the third on the checks read the
    page tables only. One lending map throughout."""
    directory, expected = wide_cache
    cache = LogitCache(directory)
    counts = _Counts(monkeypatch)
    _streaming_pass(cache, expected)
    assert counts.take() == {"written_pages": 0, "unprotected_pages": 0, "watch": 0, "maps": 1}
    _streaming_pass(cache, expected)
    second = counts.take()
    assert second["maps"] == 0 and 1 <= second["written_pages"] <= 2
    assert 1 <= second["watch"] <= 2
    kernel = pages._kernel()
    watching = kernel is not None and kernel.write_protector() is not None
    assert bool(cache._shard_maps(0)["logits"]._watched) == watching
    for _ in range(3):
        _streaming_pass(cache, expected)
        later = counts.take()
        assert later["maps"] == 0 and later["watch"] == 0
        if watching:
            assert later["written_pages"] == 0 and 1 <= later["unprotected_pages"] <= 2
        else:   # no userfaultfd here: still batched
            assert 1 <= later["written_pages"] <= 2


@pytest.mark.parametrize("writer", ["numpy", "torch", "kernel"])
def test_a_write_into_a_watched_result_is_never_lent_again(wide_cache, monkeypatch, page_scan,
                                                          writer):
    """Once the pages are watched, a result written one way or another and dropped makes the
    next read of its rows come from a new map with the file's data; its neighbours, unwritten,
    are lent again from the same map."""
    directory, expected = wide_cache
    cache = LogitCache(directory)
    for _ in range(3):
        _streaming_pass(cache, expected)
    counts = _Counts(monkeypatch)
    result = cache[64:96]
    if writer == "numpy":
        result.numpy()[5, 7] = 1
    elif writer == "torch":
        result[20:22].mul_(3)
    else:
        with open(__file__, "rb") as source:
            source.readinto(memoryview(result.numpy()).cast("B")[10000:10100])
    assert not torch.equal(result, expected[64:96])
    del result
    assert torch.equal(cache[96:128], expected[96:128])   # checks the gone results
    assert torch.equal(cache[32:64], expected[32:64])
    assert counts.take()["maps"] == 0
    assert torch.equal(cache[64:96], expected[64:96])
    assert counts.take()["maps"] == 1


def test_without_write_protection_the_checks_stay_batched_and_exact(wide_cache, monkeypatch,
                                                                    page_scan):
    """Where userfaultfd is refused (a seccomp profile, another OS), nothing is watched: every
    pass is checked with pages.written_pages, still in one or two scans, and a write is seen."""
    monkeypatch.setattr(pages, "_SYS_USERFAULTFD", None)
    monkeypatch.setattr(pages, "_process", {})
    directory, expected = wide_cache
    cache = LogitCache(directory)
    counts = _Counts(monkeypatch)
    for _ in range(3):
        _streaming_pass(cache, expected)
    assert not cache._shard_maps(0)["logits"]._watched
    calls = counts.take()
    assert calls["maps"] == 1 and calls["unprotected_pages"] == 0
    assert 2 <= calls["written_pages"] <= 4
    result = cache[0:32]
    result.numpy()[0, 0] = 7
    del result
    assert torch.equal(cache[0:32], expected[0:32]) and counts.take()["maps"] == 1


def test_one_written_result_among_many_marks_only_its_rows(wide_cache, monkeypatch, page_scan):
    """Checked together, the results that are gone are judged one by one: the written one's rows
    need a new map, every other result's rows are lent again from the same one."""
    directory, expected = wide_cache
    cache = LogitCache(directory)
    counts = _Counts(monkeypatch)
    for start in range(0, ROWS, SLICE):
        result = cache[start:start + SLICE]
        if start == 96:
            result.numpy()[15, 100] = 1   # a page inside this result (pages at its ends are
        del result                        # shared with its neighbours)
    assert counts.take()["maps"] == 1
    for start in (0, 64, 128, 224):
        assert torch.equal(cache[start:start + SLICE], expected[start:start + SLICE])
    assert counts.take() == {"written_pages": 1, "unprotected_pages": 0, "watch": 1, "maps": 0}
    assert torch.equal(cache[96:128], expected[96:128]) and counts.take()["maps"] == 1


def test_a_kernel_that_answers_wrong_is_not_trusted(monkeypatch, page_scan):
    """Each way of telling is tried once per process on a small private file map before it is
    used: a kernel that misses a write (here: every answer "nothing written") gets neither the
    page checks (every result then counts as written) nor the write protection."""
    monkeypatch.setattr(pages, "_process", {})
    monkeypatch.setattr(pages._Kernel, "unprotected", lambda self, address, num_bytes: [])
    kernel = pages._kernel()
    assert kernel is not None and kernel.write_protector() is None
    assert pages.watch(0, 4096) == []
    monkeypatch.setattr(pages, "_process", {})
    monkeypatch.setattr(pages._Kernel, "written", lambda self, address, num_bytes: [])
    assert pages._kernel() is None
    assert pages.written_pages(4096, 4096) is None and not _unwritten(4096, 4096)
