"""virtio-vsock (virtio 1.2, section 5.10) in Firecracker's hybrid form: guest
AF_VSOCK stream sockets meet host AF_UNIX sockets.

- The host connects to the Unix socket at ``uds_path`` (dksm binds and listens on
  it) and writes ``CONNECT <port>\\n``; the device asks the guest for a connection
  to that port from a host port of its own (from 2^30 up).  When the guest
  accepts, the device answers the host ``OK <host port>\\n`` and the two streams
  are joined; if it refuses, the host's socket is closed.
- The guest connects to CID 2 (the host), port P: the device connects to the Unix
  socket ``<uds_path>_<P>``; no listener there means a reset for the guest.

Packets are a 44-byte header and a payload.  Flow control is the specification's
credit scheme: each side says how much buffer it has (``buf_alloc``) and how much
it has consumed (``fwd_cnt``); the device sends the guest no more than the guest's
free credit, and refuses (resets) a connection on which the guest sends more than
the device's.  A packet with the wrong CIDs or type gets a reset; a malformed
queue is a guest error like on every device.

Why one module over 500 lines: it is one device's state machine.  The packet
handlers, the host sockets' handlers and the credit accounting all read and change
the same connection table under the device's lock; apart, each file would hold
half of every invariant (what a connection's counters mean at each step).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import socket
import stat
import struct
from collections import deque
from dataclasses import dataclass, field

from dksm.devices.virtio.device import TYPE_VSOCK, VirtioDevice, log
from dksm.devices.virtio.queue import Chain, QueueError, gather, scatter
from dksm.error import DksmError

QUEUE_SIZE = 256
RX_QUEUE = 0
TX_QUEUE = 1
EVENT_QUEUE = 2

HEADER = struct.Struct("<QQIIIHHIII")  # src/dst cid, src/dst port, len, type, op, flags, credit
HOST_CID = 2
TYPE_STREAM = 1
OP_REQUEST = 1
OP_RESPONSE = 2
OP_RST = 3
OP_SHUTDOWN = 4
OP_RW = 5
OP_CREDIT_UPDATE = 6
OP_CREDIT_REQUEST = 7
SHUTDOWN_RCV = 1
SHUTDOWN_SEND = 2

BUF_ALLOC = 256 * 1024  # what the device buffers per connection towards the host
MAX_READ = 64 * 1024  # bytes read from a host socket at a time
FIRST_LOCAL_PORT = 1 << 30
MAX_CONNECTIONS = 1024
CONNECT_LINE_MAX = 32  # "CONNECT 4294967295\n" and then some
# Packets for the guest that wait for receive buffers (resets it provoked, say): a
# guest that sends without ever offering buffers cannot make the device grow.
MAX_CONTROL = 1024


class VsockSocketError(DksmError):
    """The vsock device's host socket cannot be made; the message says why."""


class VsockListener:
    """The Unix socket the host connects to, created (never reused) at ``path``."""

    def __init__(self, path: str) -> None:
        self.path = path
        if os.path.lexists(path):
            raise VsockSocketError(
                f"vsock socket path {path} already exists (remove it, or choose another uds_path)"
            )
        try:
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as exc:
            raise VsockSocketError(f"cannot make vsock socket {path}: {exc.strerror}") from exc
        self.inode = -1
        try:
            self.sock.bind(path)
            self.inode = os.stat(path).st_ino
            self.sock.listen(128)
        except OSError as exc:
            self.close()  # removes the name if bind made it
            raise VsockSocketError(f"cannot listen on vsock socket {path}: {exc.strerror}") from exc

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(OSError):  # only the socket we made, if still there
            st = os.lstat(self.path)
            if stat.S_ISSOCK(st.st_mode) and st.st_ino == self.inode:
                os.unlink(self.path)


@dataclass
class Connection:
    """One stream between a guest port and a host Unix socket."""

    local_port: int  # the host end's vsock port
    peer_port: int  # the guest end's
    sock: socket.socket
    established: bool
    host_initiated: bool
    to_host: bytearray = field(default_factory=bytearray)
    to_guest: bytes = b""  # read from the host, not yet in a receive buffer
    fwd_cnt: int = 0  # bytes of the guest's data passed on to the host
    reported_fwd_cnt: int = 0
    rx_cnt: int = 0  # bytes sent to the guest
    peer_buf_alloc: int = 0
    peer_fwd_cnt: int = 0
    host_eof: bool = False
    paused: bool = False  # not reading the host socket (nothing can go to the guest now)
    shut_host_write: bool = False
    not_counted: int = 0  # bytes at the head of to_host that are ours, not the guest's

    @property
    def key(self) -> tuple[int, int]:
        return (self.local_port, self.peer_port)

    @property
    def credit(self) -> int:
        """Bytes the guest can take now."""
        return self.peer_buf_alloc - ((self.rx_cnt - self.peer_fwd_cnt) & 0xFFFF_FFFF)


class Vsock(VirtioDevice):
    device_type = TYPE_VSOCK
    kind = "virtio-vsock"

    def __init__(
        self, name: str, ram: memoryview, guest_cid: int, uds_path: str, listener: VsockListener
    ) -> None:
        super().__init__(name, (QUEUE_SIZE, QUEUE_SIZE, QUEUE_SIZE), ram)
        self.guest_cid = guest_cid
        self.uds_path = uds_path
        self.listener = listener
        self.connections: dict[tuple[int, int], Connection] = {}
        self.waiting_hosts: dict[int, tuple[socket.socket, bytearray]] = {}  # before CONNECT
        self.control: deque[bytes] = deque()  # packets for the guest, before any data
        self._next_rx: Chain | None = None  # a receive buffer taken, not yet filled
        self.control_dropped = 0
        self.readable: set[tuple[int, int]] = set()
        self._next_port = FIRST_LOCAL_PORT
        self._watching = False

    def offered_features(self) -> int:
        return 0

    def config_space(self) -> bytes:
        return struct.pack("<Q", self.guest_cid)

    # -- lifecycle ---------------------------------------------------------------------

    def on_activate(self) -> None:
        if self.worker is not None and not self._watching:
            self.worker.watch(self.listener.sock.fileno(), self._accept)
            self._watching = True

    def on_reset(self) -> None:
        if self.worker is not None and self._watching:
            self.worker.unwatch(self.listener.sock.fileno())
            self._watching = False
        for conn in list(self.connections.values()):
            self._drop(conn)
        for fd, (sock, _) in list(self.waiting_hosts.items()):
            self._unwatch(fd)
            sock.close()
        self.waiting_hosts.clear()
        self.control.clear()
        self.readable.clear()
        self._next_rx = None

    def close(self) -> None:
        self.on_reset()
        self.listener.close()

    # -- queues ------------------------------------------------------------------------

    def queue_notified(self, index: int) -> None:
        if index == TX_QUEUE:
            self._transmit()
        elif index == RX_QUEUE:
            for conn in self.connections.values():
                if conn.paused:
                    conn.paused = False
                    self._rewatch(conn)
        self._fill_rx()

    def _transmit(self) -> None:
        queue = self.queues[TX_QUEUE]
        served = False
        while (chain := queue.pop(self.ram)) is not None:
            if chain.writable:
                raise QueueError(f"transmit buffer {chain.head} has a device-writable part")
            data = gather(self.ram, chain.readable, HEADER.size + MAX_READ)
            if len(data) < HEADER.size:
                raise QueueError(f"packet {chain.head} is shorter than the vsock header")
            self._guest_packet(HEADER.unpack_from(data), data[HEADER.size :])
            self.used(TX_QUEUE, chain.head, 0)
            served = True
        if served:
            self.signal_used(TX_QUEUE)

    def _guest_packet(self, header: tuple[int, ...], payload: bytes) -> None:
        src_cid, dst_cid, src_port, dst_port, length, kind, op, flags, buf_alloc, fwd_cnt = header
        key = (dst_port, src_port)
        conn = self.connections.get(key)
        if src_cid != self.guest_cid or dst_cid != HOST_CID or kind != TYPE_STREAM:
            if op != OP_RST:
                self._reset_guest(dst_port, src_port)
            return
        if length > len(payload):
            log.warning(
                "%s: packet says %d payload bytes, has %d", self.label, length, len(payload)
            )
            length = len(payload)
        if conn is not None:
            conn.peer_buf_alloc = buf_alloc
            conn.peer_fwd_cnt = fwd_cnt
        if op == OP_REQUEST:
            if conn is not None:
                self._reset_guest(dst_port, src_port)
            else:
                self._guest_connects(dst_port, src_port, buf_alloc, fwd_cnt)
        elif conn is None:
            if op != OP_RST:
                self._reset_guest(dst_port, src_port)
        elif op == OP_RESPONSE:
            if conn.established:
                self._close_with_reset(conn)
            else:
                conn.established = True
                ok = f"OK {conn.local_port}\n".encode()
                conn.to_host += ok
                conn.not_counted = len(ok)
                if conn.to_guest:  # the host wrote data after its CONNECT line
                    conn.paused = True
                    self.readable.add(conn.key)
                self._flush(conn)
        elif op == OP_RW:
            if not conn.established or len(conn.to_host) + length > BUF_ALLOC:
                self._close_with_reset(conn)  # no connection yet, or more than its credit
            else:
                conn.to_host += payload[:length]
                self._flush(conn)
        elif op == OP_SHUTDOWN:
            if flags & SHUTDOWN_RCV and flags & SHUTDOWN_SEND:
                self._close_with_reset(conn)
            elif flags & SHUTDOWN_SEND:
                conn.shut_host_write = True
                self._flush(conn)
        elif op == OP_RST:
            self._drop(conn)
        elif op == OP_CREDIT_REQUEST:
            self._send_control(conn, OP_CREDIT_UPDATE)

    # -- connections -----------------------------------------------------------------------

    def _guest_connects(self, port: int, peer_port: int, buf_alloc: int, fwd_cnt: int) -> None:
        if len(self.connections) >= MAX_CONNECTIONS:
            self._reset_guest(port, peer_port)
            return
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        try:
            sock.connect(f"{self.uds_path}_{port}")
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM):  # say why: a host may fix it
                log.warning(
                    "%s: the guest's connection to %s_%d is refused: %s (a confined VMM "
                    "connects as its own user)",
                    self.label,
                    self.uds_path,
                    port,
                    exc.strerror,
                )
            sock.close()
            self._reset_guest(port, peer_port)  # nobody listens for that port
            return
        conn = Connection(port, peer_port, sock, established=True, host_initiated=False)
        conn.peer_buf_alloc, conn.peer_fwd_cnt = buf_alloc, fwd_cnt
        self._add(conn)
        self._send_control(conn, OP_RESPONSE)

    def _accept(self, events: int) -> None:
        while True:
            try:
                sock, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("%s: accepting on %s failed: %s", self.label, self.uds_path, exc)
                return
            if len(self.connections) + len(self.waiting_hosts) >= MAX_CONNECTIONS:
                sock.close()
                continue
            sock.setblocking(False)
            fd = sock.fileno()
            self.waiting_hosts[fd] = (sock, bytearray())
            if self.worker is not None:
                self.worker.watch(fd, functools.partial(self._connect_line, fd))

    def _connect_line(self, fd: int, events: int) -> None:
        """Read the host's ``CONNECT <port>\\n`` and ask the guest for the connection."""
        sock, line = self.waiting_hosts[fd]
        try:
            data = sock.recv(CONNECT_LINE_MAX)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        line += data
        end = line.find(b"\n")
        if not data or (end < 0 and len(line) > CONNECT_LINE_MAX):
            self._unwatch(fd)
            del self.waiting_hosts[fd]
            sock.close()
            return
        if end < 0:
            return
        self._unwatch(fd)
        del self.waiting_hosts[fd]
        words = bytes(line[:end]).split()
        if len(words) != 2 or words[0] != b"CONNECT" or not words[1].isdigit():
            sock.close()
            return
        port = int(words[1])
        if port > 0xFFFF_FFFF:
            sock.close()
            return
        conn = Connection(self._local_port(), port, sock, established=False, host_initiated=True)
        conn.to_guest = bytes(line[end + 1 :])  # what the host sent after the line
        self._add(conn)
        self._send_control(conn, OP_REQUEST)
        self._fill_rx()

    def _local_port(self) -> int:
        used = {key[0] for key in self.connections}
        while True:
            port = self._next_port
            self._next_port = FIRST_LOCAL_PORT if port >= 0xFFFF_FFFF else port + 1
            if port not in used:
                return port

    def _add(self, conn: Connection) -> None:
        self.connections[conn.key] = conn
        if self.worker is not None:
            self.worker.watch(conn.sock.fileno(), functools.partial(self._host_event, conn), 0)
        self._rewatch(conn)

    def _rewatch(self, conn: Connection) -> None:
        if self.worker is None or conn.key not in self.connections:
            return
        mask = 0
        if conn.established and not conn.paused and not conn.host_eof and not conn.to_guest:
            mask |= select.EPOLLIN
        if conn.to_host:
            mask |= select.EPOLLOUT
        self.worker.modify(conn.sock.fileno(), mask)

    def _unwatch(self, fd: int) -> None:
        if self.worker is not None:
            self.worker.unwatch(fd)

    def _host_event(self, conn: Connection, events: int) -> None:
        if events & select.EPOLLOUT:
            self._flush(conn)
        if events & (select.EPOLLIN | select.EPOLLHUP | select.EPOLLERR):
            conn.paused = True  # until its data is in the guest's buffers
            self.readable.add(conn.key)
            self._rewatch(conn)
        self._fill_rx()

    def _flush(self, conn: Connection) -> None:
        """Pass what the guest sent on to the host socket, as far as it takes it."""
        if conn.to_host:
            try:
                sent = conn.sock.send(conn.to_host)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                if exc.errno not in (errno.EPIPE, errno.ECONNRESET):
                    log.warning("%s: host socket write failed: %s", self.label, exc.strerror)
                self._close_with_reset(conn)
                return
            del conn.to_host[:sent]
            ours = min(sent, conn.not_counted)
            conn.not_counted -= ours
            if sent > ours:
                conn.fwd_cnt = (conn.fwd_cnt + sent - ours) & 0xFFFF_FFFF
                if (conn.fwd_cnt - conn.reported_fwd_cnt) & 0xFFFF_FFFF >= BUF_ALLOC // 4:
                    self._send_control(conn, OP_CREDIT_UPDATE)
        if not conn.to_host and conn.shut_host_write:
            with contextlib.suppress(OSError):
                conn.sock.shutdown(socket.SHUT_WR)
        self._rewatch(conn)

    def _drop(self, conn: Connection) -> None:
        if self.connections.pop(conn.key, None) is None:
            return
        self._unwatch(conn.sock.fileno())
        conn.sock.close()
        self.readable.discard(conn.key)

    def _close_with_reset(self, conn: Connection) -> None:
        self._drop(conn)
        self._reset_guest(conn.local_port, conn.peer_port)

    # -- to the guest -------------------------------------------------------------------------

    def _header(
        self, conn: Connection | None, local: int, peer: int, op: int, length: int
    ) -> bytes:
        fwd = conn.fwd_cnt if conn is not None else 0
        if conn is not None:
            conn.reported_fwd_cnt = fwd
        return HEADER.pack(
            HOST_CID, self.guest_cid, local, peer, length, TYPE_STREAM, op, 0, BUF_ALLOC, fwd
        )

    def _send_control(self, conn: Connection, op: int) -> None:
        self._queue_control(self._header(conn, conn.local_port, conn.peer_port, op, 0))

    def _reset_guest(self, local: int, peer: int) -> None:
        self._queue_control(self._header(None, local, peer, OP_RST, 0))

    def _queue_control(self, packet: bytes) -> None:
        if len(self.control) < MAX_CONTROL:
            self.control.append(packet)
        else:
            self.control_dropped += 1

    def _fill_rx(self) -> None:
        """Put control packets, then host data the guest has credit for, into the
        receive buffers the driver offered, until either runs out."""
        if not self.activated or self.needs_reset:
            return
        delivered = False
        progress = True
        while progress:
            progress = False
            while self.control:
                if not self._deliver(self.control[0]):
                    return self._signal_if(delivered)
                self.control.popleft()
                delivered = progress = True
            for key in list(self.readable):
                conn = self.connections.get(key)
                if conn is None:
                    self.readable.discard(key)
                    continue
                if conn.credit <= 0:
                    continue  # until the guest's credit update
                if not conn.to_guest and not self._read_host(conn):
                    progress = progress or bool(self.control)  # an end of stream to tell
                    continue
                room = self._rx_room()
                if room is None:
                    return self._signal_if(delivered)
                take = conn.to_guest[: min(room - HEADER.size, conn.credit)]
                conn.to_guest = conn.to_guest[len(take) :]
                conn.rx_cnt = (conn.rx_cnt + len(take)) & 0xFFFF_FFFF
                header = self._header(conn, conn.local_port, conn.peer_port, OP_RW, len(take))
                self._deliver(header + take)
                delivered = progress = True
        self._signal_if(delivered)

    def _rx_room(self) -> int | None:
        """The size of the next receive buffer, or None if the driver offered none."""
        queue = self.queues[RX_QUEUE]
        if self._next_rx is None:
            chain = queue.pop(self.ram)
            if chain is None:
                return None
            if chain.readable:
                raise QueueError(f"receive buffer {chain.head} has a device-readable part")
            if chain.writable_length < HEADER.size:
                raise QueueError(f"receive buffer {chain.head} is smaller than the vsock header")
            self._next_rx = chain
        return self._next_rx.writable_length

    def _deliver(self, packet: bytes) -> bool:
        if self._rx_room() is None or self._next_rx is None:
            return False
        chain, self._next_rx = self._next_rx, None
        self.used(RX_QUEUE, chain.head, scatter(self.ram, chain.writable, packet))
        return True

    def _signal_if(self, delivered: bool) -> None:
        if delivered:
            self.signal_used(RX_QUEUE)

    def _read_host(self, conn: Connection) -> bool:
        """Read what the host sent on ``conn``; False once there is nothing to read."""
        if conn.host_eof:
            self.readable.discard(conn.key)
            return False
        try:
            data = conn.sock.recv(min(conn.credit, MAX_READ))
        except BlockingIOError:
            self.readable.discard(conn.key)
            conn.paused = False
            self._rewatch(conn)
            return False
        except OSError:
            data = b""
        if not data:  # the host closed its end: tell the guest both directions are done
            conn.host_eof = True
            self.readable.discard(conn.key)
            self._queue_control(
                HEADER.pack(
                    HOST_CID,
                    self.guest_cid,
                    conn.local_port,
                    conn.peer_port,
                    0,
                    TYPE_STREAM,
                    OP_SHUTDOWN,
                    SHUTDOWN_RCV | SHUTDOWN_SEND,
                    BUF_ALLOC,
                    conn.fwd_cnt,
                )
            )
            return False
        conn.to_guest = data
        return True
