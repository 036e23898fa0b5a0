"""The pool against a model: random sequences of admit, release, kill and sweep on a
real PagePool on tmpfs, checked after every step against a dict of page content ->
expected references.

Admitting maps pages into real anonymous memory (``map_pages``, or ``merge`` over
memory that already holds them); killing forks a real child that opens the pool,
takes a lease, maps pages and is SIGKILLed; sweeping must return exactly the dead
leases.  After each step ``verify()`` finds nothing, the counts (distinct pages,
references, leases, the pages file's allocated blocks) are exactly the model's, and
every live mapping still shows its bytes (no slot in use was ever punched).

The run is short by default (the "ci" profile, tests/conftest.py); a longer one:
``DKSM_HYPOTHESIS_PROFILE=long .venv/bin/pytest tests/test_pool_model.py``.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import shutil
import signal
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    rule,
)

from dksm.dedup.pool import Lease, PagePool
from dksm.memory.host_mapping import PAGE_SIZE, map_anonymous, unmap, view

from conftest import SHM

# A few distinct pages, so that loads share most of what they bring.
CONTENTS = [random.Random(seed).randbytes(PAGE_SIZE) for seed in range(6)]
_domains = itertools.count()

pages_to_load = st.lists(st.integers(0, len(CONTENTS) - 1), min_size=1, max_size=5)


def first_byte_parity(page: memoryview) -> int:
    """A hash so weak that most distinct pages collide: byte comparison must catch it."""
    return page[0] & 1


@dataclass
class LiveLease:
    lease: Lease
    regions: list[tuple[int, list[int]]] = field(default_factory=list)  # address, pages

    def counts(self) -> Counter[int]:
        return Counter(page for _, pages in self.regions for page in pages)


def load(lease: Lease, pages: list[int], *, merge: bool) -> int:
    """Map ``pages`` into fresh anonymous memory from the pool; return its address."""
    content = b"".join(CONTENTS[page] for page in pages)
    address = map_anonymous(len(content))
    if merge:  # the madvise-like path: memory that holds the bytes already
        view(address, len(content))[:] = content
        result = lease.merge(address, len(content))
    else:
        result = lease.map_pages(address, content)
    assert result.mapped and result.pages == len(pages)
    return address


class PoolModel(RuleBasedStateMachine):
    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.root = Path(tempfile.mkdtemp(prefix="dksm-test-model-", dir=SHM))
        self.pool: PagePool | None = None
        self.live: Counter[int] = Counter()  # page -> references held by live leases
        self.dead: Counter[int] = Counter()  # ... held by leases of killed children
        self.held: list[LiveLease] = []  # what the "leases" bundle holds, in order
        self.dead_leases = 0
        self.hash: Callable[[memoryview], int] | None = None

    @initialize(weak_hash=st.booleans())
    def open_pool(self, weak_hash: bool) -> None:
        self.hash = first_byte_parity if weak_hash else None
        self.domain = f"model-{next(_domains)}"
        self.pool = PagePool.open(self.domain, self.root, page_hash=self.hash)

    @property
    def opened(self) -> PagePool:
        assert self.pool is not None
        return self.pool

    @rule(target=leases, pages=pages_to_load, merge=st.booleans())
    def admit(self, pages: list[int], merge: bool) -> LiveLease:
        held = LiveLease(self.opened.lease())
        held.regions.append((load(held.lease, pages, merge=merge), pages))
        self.live.update(pages)
        self.held.append(held)
        return held

    @rule(held=leases, pages=pages_to_load, merge=st.booleans())
    def admit_more(self, held: LiveLease, pages: list[int], merge: bool) -> None:
        held.regions.append((load(held.lease, pages, merge=merge), pages))
        self.live.update(pages)

    @rule(held=consumes(leases))
    def release(self, held: LiveLease) -> None:
        for address, pages in held.regions:  # unmap first, then release
            unmap(address, len(pages) * PAGE_SIZE)
        held.lease.release()
        self.live.subtract(held.counts())
        self.held.remove(held)

    @rule(pages=pages_to_load)
    def kill(self, pages: list[int]) -> None:
        """A child takes a lease, maps pages, says so, and is SIGKILLed."""
        reader, writer = os.pipe()
        pid = os.fork()
        if pid == 0:
            try:
                os.close(reader)
                pool = PagePool.open(self.domain, self.root, page_hash=self.hash, sweep=False)
                load(pool.lease(), pages, merge=False)
                os.write(writer, b"mapped")
                signal.pause()
            finally:
                os._exit(1)
        os.close(writer)
        try:
            assert os.read(reader, 16) == b"mapped"
        finally:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(reader)
        self.dead.update(pages)
        self.dead_leases += 1

    @rule()
    def sweep(self) -> None:
        assert self.opened.sweep() == self.dead_leases
        self.dead.clear()
        self.dead_leases = 0

    @invariant()
    def matches_the_model(self) -> None:
        if self.pool is None:
            return
        pool = self.pool
        assert pool.verify() == []
        expected = self.live + self.dead  # drops pages whose count is zero
        stats = pool.stats()
        assert stats.hashtable_entries == len(expected)
        assert stats.references == sum(expected.values())
        assert stats.leases == len(self.held) + self.dead_leases
        blocks = os.stat(self.root / self.domain / "pages").st_blocks * 512
        assert blocks == stats.file_blocks_bytes == len(expected) * PAGE_SIZE

    @invariant()
    def live_mappings_keep_their_bytes(self) -> None:
        for held in self.held:
            for address, pages in held.regions:
                shown = view(address, len(pages) * PAGE_SIZE)
                assert shown == b"".join(CONTENTS[page] for page in pages)

    def teardown(self) -> None:
        try:
            if self.pool is not None:
                for held in list(self.held):
                    self.release(held)
                self.pool.purge()  # sweeps the dead, then removes every file
                assert not (self.root / self.domain).exists()
        finally:
            with contextlib.suppress(Exception):
                if self.pool is not None:
                    self.pool.close()
            shutil.rmtree(self.root, ignore_errors=True)


TestPoolModel = PoolModel.TestCase
# Each example forks and kills processes on a real tmpfs: a twentieth of the profile's
# examples (25 in CI, 1,000 in the long run).
TestPoolModel.settings = settings(max_examples=max(25, settings().max_examples // 20))
