"""virtio-block (virtio 1.2, section 5.2): a file on the host as the guest's disk.

Requests are a 16-byte header (type, reserved, sector), the data, and one status
byte the device writes last.  Reads, writes, flushes and the device ID are served;
every request is checked against the disk's size before the file is touched, so a
guest can reach no byte outside it.  A read-only drive offers ``VIRTIO_BLK_F_RO``
and answers writes with an IO error without writing anything.  A host-side failure
(a full disk, an IO error) fails that request, not the VM.

Firecracker's drive options map as follows: ``is_read_only`` opens the file
read-only; ``cache_type`` "Writeback" offers ``VIRTIO_BLK_F_FLUSH`` (flush =
``fsync``), "Unsafe" (its default) does not, though a flush is still honoured.
"""

from __future__ import annotations

import os
import stat
import struct
from dataclasses import dataclass

from dksm.devices.virtio.device import TYPE_BLOCK, VirtioDevice, log
from dksm.devices.virtio.queue import Chain, QueueError, gather, views
from dksm.error import DksmError

SECTOR_SIZE = 512
QUEUE_SIZE = 256  # Firecracker's
ID_BYTES = 20  # VIRTIO_BLK_ID_BYTES

F_RO = 1 << 5
F_FLUSH = 1 << 9

T_IN = 0
T_OUT = 1
T_FLUSH = 4
T_GET_ID = 8

S_OK = 0
S_IOERR = 1
S_UNSUPP = 2

REQUEST_HEADER = struct.Struct("<IIQ")
LOGGED_HOST_ERRORS = 10


class BackingFileError(DksmError):
    """A drive's backing file cannot be used; the message names it and why."""


@dataclass(frozen=True)
class BackingFile:
    """An open drive file: its descriptor, size and whether the guest may write."""

    path: str
    fd: int
    size: int
    read_only: bool

    @property
    def capacity(self) -> int:
        """Whole 512-byte sectors; a partial last sector is not visible to the guest."""
        return self.size // SECTOR_SIZE

    def close(self) -> None:
        os.close(self.fd)


def open_backing_file(path: str, read_only: bool) -> BackingFile:
    """Open ``path`` for a drive: a regular file or a block device, read-write unless
    ``read_only``.  The path is checked with ``stat`` before it is opened, so that no
    other kind of file is ever opened (a FIFO would block the open, a character
    device may act on it), and the opened file again with ``fstat``."""
    mode = "read-only" if read_only else "read-write"
    flags = (os.O_RDONLY if read_only else os.O_RDWR) | os.O_CLOEXEC | os.O_NOCTTY
    try:
        _check_kind(os.stat(path).st_mode, path)
        fd = os.open(path, flags | os.O_NONBLOCK)  # no effect on files and disks
    except OSError as exc:
        raise BackingFileError(f"cannot open drive file {path} {mode}: {exc.strerror}") from exc
    try:
        st = os.fstat(fd)
        _check_kind(st.st_mode, path)
        size = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(fd, 0, os.SEEK_END)
    except BaseException:
        os.close(fd)
        raise
    if size % SECTOR_SIZE:
        log.warning(
            "drive file %s is %d bytes, not a whole number of %d-byte sectors: "
            "the last %d bytes are not visible to the guest",
            path,
            size,
            SECTOR_SIZE,
            size % SECTOR_SIZE,
        )
    return BackingFile(path, fd, size, read_only)


def _check_kind(st_mode: int, path: str) -> None:
    if not (stat.S_ISREG(st_mode) or stat.S_ISBLK(st_mode)):
        raise BackingFileError(f"drive file {path} is not a regular file or a block device")


class Block(VirtioDevice):
    device_type = TYPE_BLOCK
    kind = "virtio-block"

    def __init__(
        self, name: str, ram: memoryview, backing: BackingFile, *, flush: bool = False
    ) -> None:
        super().__init__(name, (QUEUE_SIZE,), ram)
        self.backing = backing
        self.flush = flush
        self.device_id = name.encode("ascii", "replace")[:ID_BYTES]
        self.host_errors = 0
        self.requests = 0

    def offered_features(self) -> int:
        return (F_RO if self.backing.read_only else 0) | (F_FLUSH if self.flush else 0)

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.backing.capacity)

    def queue_notified(self, index: int) -> None:
        queue = self.queues[index]
        served = False
        while (chain := queue.pop(self.ram)) is not None:
            written = self._serve(chain)
            self.used(index, chain.head, written)
            served = True
        if served:
            self.signal_used(index)

    def _serve(self, chain: Chain) -> int:
        """Carry out one request; returns the bytes written into the chain."""
        if not chain.writable:
            raise QueueError(f"request {chain.head} has no device-writable status byte")
        self.requests += 1
        status_at = chain.writable[-1][0] + chain.writable[-1][1] - 1
        data_in = chain.writable_length - 1  # room for data the device writes
        header = gather(self.ram, chain.readable, REQUEST_HEADER.size)
        if len(header) < REQUEST_HEADER.size:
            self.ram[status_at] = S_IOERR
            return 1
        kind, _, sector = REQUEST_HEADER.unpack(header)
        written = 0
        if kind == T_IN:
            status, written = self._read(chain, sector, data_in)
        elif kind == T_OUT:
            status = self._write(chain, sector, chain.readable_length - REQUEST_HEADER.size)
        elif kind == T_FLUSH:
            status = self._flush()
        elif kind == T_GET_ID:
            written = min(ID_BYTES, data_in)
            data = self.device_id.ljust(ID_BYTES, b"\0")[:written]
            for view in views(self.ram, chain.writable, 0, written):
                view[:] = data[: len(view)]
                data = data[len(view) :]
            status = S_OK
        else:
            status = S_UNSUPP
        self.ram[status_at] = status
        return written + 1

    def _in_bounds(self, sector: int, length: int) -> bool:
        return length % SECTOR_SIZE == 0 and sector * SECTOR_SIZE + length <= (
            self.backing.capacity * SECTOR_SIZE
        )

    def _read(self, chain: Chain, sector: int, length: int) -> tuple[int, int]:
        if not self._in_bounds(sector, length):
            return S_IOERR, 0
        offset = sector * SECTOR_SIZE
        done = 0
        try:
            while done < length:
                n = os.preadv(
                    self.backing.fd,
                    views(self.ram, chain.writable, done, length - done),
                    offset + done,
                )
                if n == 0:
                    return S_IOERR, done  # the file shrank under us
                done += n
        except OSError as exc:
            self._host_error("read", offset, exc)
            return S_IOERR, done
        return S_OK, length

    def _write(self, chain: Chain, sector: int, length: int) -> int:
        if self.backing.read_only or length < 0 or not self._in_bounds(sector, length):
            return S_IOERR
        offset = sector * SECTOR_SIZE
        done = 0
        try:
            while done < length:
                parts = views(self.ram, chain.readable, REQUEST_HEADER.size + done, length - done)
                done += os.pwritev(self.backing.fd, parts, offset + done)
        except OSError as exc:
            self._host_error("write", offset, exc)
            return S_IOERR
        return S_OK

    def _flush(self) -> int:
        if self.backing.read_only:
            return S_OK
        try:
            os.fsync(self.backing.fd)
        except OSError as exc:
            self._host_error("flush", 0, exc)
            return S_IOERR
        return S_OK

    def _host_error(self, what: str, offset: int, exc: OSError) -> None:
        self.host_errors += 1
        if self.host_errors <= LOGGED_HOST_ERRORS:
            log.warning(
                "%s: %s at byte %d of %s failed: %s (the guest sees an IO error)",
                self.label,
                what,
                offset,
                self.backing.path,
                exc.strerror,
            )

    def close(self) -> None:
        self.backing.close()
