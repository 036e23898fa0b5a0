"""The consistency check of a pool: its index against itself and its pages file.

What ``dksm pool verify`` reports.  Each problem is one sentence; an empty list
means every record agrees with every other and with the file, i.e. the invariants
written at the top of :mod:`dksm.dedup.pool` hold: hash and slot records name each
other, every reference is held by exactly one lease chunk or manifest, every
manifest is used by the leases that say so (and by at least one), slots and free
ranges make up the file's slots without overlapping, and the file holds storage
for the slots in use and nothing else.  With hashes checked, each manifest's slots
are read back and must hash to its key: it maps exactly the content it names.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator

from dksm.dedup.index import PoolIndex, Transaction
from dksm.dedup.pages_file import PagesFile
from dksm.memory.host_mapping import PAGE_SIZE


def problems(
    index: PoolIndex,
    pages: PagesFile,
    txn: Transaction,
    hash_key: Callable[[memoryview], bytes] | None,
    span_key: Callable[[memoryview], bytes] | None = None,
) -> Iterator[str]:
    """The problems of the pool as ``txn`` sees it; with ``hash_key``, every stored
    page's hash is recomputed and compared too, and with ``span_key`` every
    manifest's content."""
    end = index.end(txn)
    slot_records = {r.slot: r for r in index.slot_records(txn)}
    hash_entries = list(index.hash_entries(txn))
    for page_hash, slot in hash_entries:
        record = slot_records.get(slot)
        if record is None or record.page_hash != page_hash:
            yield f"hash {page_hash.hex()} names slot {slot}, which does not hold it"
    if len(hash_entries) != len(slot_records):
        yield f"{len(hash_entries)} hash entries for {len(slot_records)} slots"
    yield from index.slot_block_problems(txn)
    held: Counter[int] = Counter()
    leases = {r.lease_id: r for r in index.lease_records(txn)}
    manifests = {m.key: m for m in index.manifest_records(txn)}
    users = index.manifest_use_counts(txn)
    used: Counter[bytes] = Counter()
    through_manifests: Counter[int] = Counter()  # lease -> references via manifests
    for lease_id, key, uses in index.lease_manifest_uses(txn):
        used[key] += uses
        manifest = manifests.get(key)
        if manifest is None:
            yield f"lease {lease_id} uses manifest {key.hex()}, which does not exist"
        else:
            through_manifests[lease_id] += uses * len(manifest.slots)
        if lease_id not in leases:
            yield f"manifest {key.hex()} is used by lease {lease_id}, which does not exist"
    for key, manifest in manifests.items():
        held.update(manifest.slots)  # a manifest's own references
        if users.get(key, 0) <= 0 or users.get(key, 0) != used[key]:
            yield (
                f"manifest {key.hex()} counts {users.get(key, 0)} use(s), leases hold {used[key]}"
            )
    for key in users.keys() - manifests.keys():
        yield f"a use count is kept for manifest {key.hex()}, which does not exist"
    lease_references = 0
    for lease_id in index.lease_ids_with_chunks(txn) | set(leases):
        lease_total = through_manifests[lease_id]
        for _, chunk in index.lease_chunks(txn, lease_id):
            held.update(chunk)
            lease_total += len(chunk)
        lease_references += lease_total
        lease = leases.get(lease_id)
        if lease is None:
            yield f"slots are held under lease {lease_id}, which does not exist"
        elif lease.references != lease_total:
            yield f"lease {lease_id} counts {lease.references} references, holds {lease_total}"
    for slot, record in slot_records.items():
        if record.references != held[slot]:
            yield f"slot {slot} counts {record.references} references, leases hold {held[slot]}"
        if slot >= end:
            yield f"slot {slot} lies beyond the end ({end})"
    for slot in held.keys() - slot_records.keys():
        yield f"leases hold slot {slot}, which is not in the pool"
    counters = index.read_counters(txn)
    if counters["references"] != lease_references:
        yield f"references counter {counters['references']} != {lease_references} held"
    previous_end = -1
    free_slots = 0
    for first, length in index.free_ranges(txn):
        if length <= 0 or first <= previous_end or first + length >= end:
            yield f"free range {first}+{length} overlaps, touches another or the end ({end})"
        if any(first <= slot < first + length for slot in slot_records):
            yield f"free range {first}+{length} holds slots in use"
        previous_end = first + length
        free_slots += length
    if free_slots + len(slot_records) != end:
        yield f"{len(slot_records)} slots and {free_slots} free do not make up the end {end}"
    blocks = pages.allocated_bytes()
    if blocks != len(slot_records) * PAGE_SIZE:
        yield f"the pages file holds {blocks} bytes for {len(slot_records)} pages"
    if pages.size() < end * PAGE_SIZE:
        yield f"the pages file is shorter than its {end} slots"
    if hash_key is not None:
        for slot, record in slot_records.items():
            page = memoryview(pages.read(slot, 1))
            if hash_key(page) != record.page_hash:
                yield f"slot {slot} does not hold a page with its recorded hash"
    if span_key is not None:
        for key, manifest in manifests.items():
            if not all(slot in slot_records for slot in manifest.slots):
                continue  # reported above
            content = b"".join(pages.read(slot, 1) for slot in manifest.slots)
            if span_key(memoryview(content)) != key:
                yield f"manifest {key.hex()} names slots that do not hold its content"
