"""HTTP/1.1 over a Unix socket, on one thread: the transport of Firecracker's API.

One thread serves every connection from one epoll set, as Firecracker's API thread
does; the HTTP parsing is h11's (a sans-I/O HTTP/1.1 implementation), so this module
only moves bytes and enforces the limits that keep a client from hurting the VMM:

- a request body larger than the payload limit (Firecracker's default is 51,200
  bytes) is answered 413 and the connection closed;
- headers are bounded (h11's incomplete-event limit), answered 431/400;
- a request that has begun but does not complete within ``REQUEST_TIMEOUT_S`` is
  answered 408 and its connection closed, so a client that stalls mid-request
  cannot hold the server; one that hangs up mid-request is simply forgotten;
- at most ``MAX_CONNECTIONS`` clients at once; more are answered 503 and closed.

The socket is bound and listening when :class:`ApiServer` is made, before any VM
exists; the thread needs only epoll, accept4, recvfrom, sendto, close, poll and the
futexes of the locks it shares with the VMM (and whatever a request's handler does).
"""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import h11

from dksm.error import DksmError

DEFAULT_MAX_PAYLOAD = 51200  # Firecracker's HTTP_MAX_PAYLOAD_SIZE
MAX_HEADER_BYTES = 16 * 1024
MAX_CONNECTIONS = 32
REQUEST_TIMEOUT_S = 5.0
DRAIN_S = 1.0
DRAIN_BYTES = 1 << 20
SEND_TIMEOUT_S = 2.0
RECV_SIZE = 64 * 1024
SERVER_NAME = b"Firecracker API"  # what Firecracker's server calls itself


class ApiSocketError(DksmError):
    """The API socket cannot be created."""


# (status, JSON body bytes or b"") for (method, path, body)
Handler = Callable[[str, str, bytes], tuple[int, bytes]]


@dataclass
class _Client:
    sock: socket.socket
    conn: h11.Connection
    method: str = ""
    target: str = ""
    body: bytearray = field(default_factory=bytearray)
    started: float | None = None  # when the current request's first byte came
    # Answered and closing: what the client still sends is read and dropped until it
    # hangs up or this time passes, so that closing with its bytes unread does not
    # reset the connection before it has read the answer.
    draining_until: float | None = None


def _fault(message: str) -> bytes:
    import json

    return json.dumps({"fault_message": message}).encode()


class ApiServer:
    def __init__(
        self, path: str, handler: Handler, *, max_payload: int = DEFAULT_MAX_PAYLOAD
    ) -> None:
        self.path = path
        self.handler = handler
        self.max_payload = max_payload
        self.requests_served = 0
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.bind(path)  # an existing path is refused, as Firecracker does
            sock.listen(MAX_CONNECTIONS)
        except OSError as exc:
            sock.close()
            raise ApiSocketError(f"cannot create the API socket {path}: {exc.strerror}") from exc
        sock.setblocking(False)
        self.sock = sock
        self._selector = selectors.EpollSelector()
        self._selector.register(sock, selectors.EVENT_READ, None)
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        self._clients: dict[int, _Client] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- lifetime ---------------------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self.serve, name="fc_api", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop serving, close every connection and remove the socket file."""
        self._stopping = True
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        for client in list(self._clients.values()):
            self._drop(client)
        with contextlib.suppress(KeyError, ValueError):
            self._selector.unregister(self.sock)
        self.sock.close()
        self._selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
        # A confined VMM may not remove it (the process that started it does).
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(self.path)

    def serve(self) -> None:
        while not self._stopping:
            for key, _events in self._selector.select(self._next_timeout()):
                if key.data == "wake":
                    return
                if key.fileobj is self.sock:
                    self._accept()
                else:
                    client = self._clients.get(key.fd)
                    if client is not None:
                        self._receive(client)
            self._expire()

    def _next_timeout(self) -> float | None:
        deadlines = [c.started + REQUEST_TIMEOUT_S for c in self._clients.values() if c.started]
        deadlines += [c.draining_until for c in self._clients.values() if c.draining_until]
        if not deadlines:
            return None
        return max(0.0, min(deadlines) - time.monotonic())

    # -- connections ------------------------------------------------------------------

    def _accept(self) -> None:
        try:
            sock, _ = self.sock.accept()
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            return  # out of descriptors, say: the client retries
        sock.settimeout(SEND_TIMEOUT_S)
        client = _Client(
            sock, h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADER_BYTES)
        )
        if len(self._clients) >= MAX_CONNECTIONS:
            self._answer(client, 503, _fault("Too many connections to the API socket."))
            sock.close()
            return
        self._clients[sock.fileno()] = client
        self._selector.register(sock, selectors.EVENT_READ, None)

    def _drop(self, client: _Client) -> None:
        self._clients.pop(client.sock.fileno(), None)
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._selector.unregister(client.sock)
        client.sock.close()

    def _close_after_answer(self, client: _Client) -> None:
        """Stop writing, and read (and drop) what the client still sends for a moment."""
        with contextlib.suppress(OSError):
            client.sock.shutdown(socket.SHUT_WR)
        client.draining_until = time.monotonic() + DRAIN_S
        client.started = None
        client.body.clear()

    def _expire(self) -> None:
        now = time.monotonic()
        for client in list(self._clients.values()):
            if client.draining_until is not None:
                if now > client.draining_until:
                    self._drop(client)
            elif client.started is not None and now - client.started > REQUEST_TIMEOUT_S:
                self._answer(client, 408, _fault("The request was not completed in time."))
                self._close_after_answer(client)

    def _receive(self, client: _Client) -> None:
        try:
            data = client.sock.recv(RECV_SIZE)
        except (BlockingIOError, InterruptedError, TimeoutError):
            return
        except OSError:
            self._drop(client)
            return
        if client.draining_until is not None:
            client.body += data[: max(0, DRAIN_BYTES - len(client.body))]
            if not data or len(client.body) >= DRAIN_BYTES:
                self._drop(client)
            return
        if client.started is None and data:
            client.started = time.monotonic()
        try:
            client.conn.receive_data(data)
            self._events(client)
        except h11.RemoteProtocolError as exc:
            status = exc.error_status_hint
            self._answer(client, status, _fault(f"Malformed HTTP request: {exc}"))
            self._close_after_answer(client)
        if not data and client.sock.fileno() in self._clients and client.draining_until is None:
            self._drop(client)  # hung up (mid-request or not): nobody to answer

    def _events(self, client: _Client) -> None:
        while client.sock.fileno() in self._clients and client.draining_until is None:
            event = client.conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                if event is h11.PAUSED and client.conn.our_state is h11.DONE:
                    self._next_cycle(client)
                    continue
                return
            if isinstance(event, h11.Request):
                client.method = event.method.decode("ascii", "replace")
                client.target = event.target.decode("ascii", "replace")
                client.body.clear()
                length = _content_length(event.headers)
                if length is not None and length > self.max_payload:
                    self._too_large(client)
                    return
            elif isinstance(event, h11.Data):
                client.body += event.data
                if len(client.body) > self.max_payload:
                    self._too_large(client)
                    return
            elif isinstance(event, h11.EndOfMessage):
                status, body = self.handler(client.method, client.target, bytes(client.body))
                self.requests_served += 1
                self._answer(client, status, body)
                client.started = None
                if client.conn.our_state is h11.MUST_CLOSE:
                    self._close_after_answer(client)
                    return
                self._next_cycle(client)
            elif isinstance(event, h11.ConnectionClosed):
                self._drop(client)
                return

    def _next_cycle(self, client: _Client) -> None:
        try:
            client.conn.start_next_cycle()
        except h11.LocalProtocolError:
            self._drop(client)

    def _too_large(self, client: _Client) -> None:
        self._answer(
            client,
            413,
            _fault(f"Request payload is larger than the limit of {self.max_payload} bytes."),
        )
        self._close_after_answer(client)

    def _answer(self, client: _Client, status: int, body: bytes) -> None:
        headers = [(b"Server", SERVER_NAME), (b"Content-Length", str(len(body)).encode())]
        if body:
            headers.append((b"Content-Type", b"application/json"))
        try:
            data = client.conn.send(h11.Response(status_code=status, headers=headers))
            data += client.conn.send(h11.Data(data=body)) if body else b""
            data += client.conn.send(h11.EndOfMessage())
        except h11.LocalProtocolError:
            # h11 cannot frame an answer here (the request was never parsed):
            # write a minimal one by hand.
            reason = {400: b"Bad Request", 408: b"Request Timeout", 413: b"Payload Too Large"}
            data = (
                b"HTTP/1.1 %d %s\r\nServer: %s\r\nContent-Length: %d\r\n"
                b"Content-Type: application/json\r\nConnection: close\r\n\r\n"
                % (status, reason.get(status, b"Error"), SERVER_NAME, len(body))
            ) + body
        with contextlib.suppress(OSError):
            client.sock.sendall(data)


def _content_length(headers: Iterable[tuple[bytes, bytes]]) -> int | None:
    for name, value in headers:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None
