"""The gunicorn worker of `diffqueue web`: gthread, but a request reaches a thread only
once all of it has arrived.

gunicorn's gthread worker hands a connection to a thread as soon as its first bytes
arrive, and the thread then reads the rest of the request, head and body, from the
socket. A client that trickles its body (a byte a second) holds that thread for as long
as it likes; a few such clients held every thread, and `/healthz` waited 37 s behind
ten of them. gunicorn 27 itself only defers connections that have sent nothing yet.

`BufferedThreadWorker` keeps gthread (its thread pool, keep-alive, parser, WSGI and
response code) and moves reading onto the worker's main loop, the one that already
polls the listening sockets and the idle kept-alive connections:

1. The main loop reads whatever a connection has sent, without blocking, into that
   connection's `_Inbox`: the head in memory, then the whole request in a
   `SpooledTemporaryFile` (in memory up to SPOOL_MEMORY_BYTES, on disk past it, so a
   1 GiB upload is never held in memory).
2. Where the request ends is found with gunicorn's own parser: the head is parsed as
   gunicorn will parse it, which says whether the body has a Content-Length or is
   chunked (a small scanner, `_ChunkedEnd`, then finds the chunked body's end).
3. Then the request goes to a thread, whose gunicorn parser reads it from the spool,
   never from the socket, so no thread ever waits for a client to send. The response
   is written to the socket as gthread does.

The other ways out were worse: a deadline on reading a request still lets as many
slow clients as there are threads take every thread, each up to the deadline;
gevent changes the whole app's concurrency (a CPU-bound dataset check would stall
every request of its process); waitress buffers requests this way, but in one process
with one I/O thread, and gunicorn's processes, access log and deployment would go.

What a waiting connection costs is a socket and its buffered bytes: gunicorn's
`--worker-connections` (1000 a process) bounds how many there are, CLIENT_TIMEOUT_S
bounds how long a connection may stay silent mid-request, and a body may be at most
the upload limit (DIFFQUEUE_UPLOAD_MAX_BYTES plus the multipart slack): a larger
declared body goes to the app at once, with its head only, and is refused there (413).
A client that reads a large response slowly still holds the thread writing it (the
response is not buffered here). In production nginx is in front (deploy/nginx.conf):
it bounds the time of a whole head, of each body read and each response write, and
takes responses as fast as the web writes them.

TLS and HTTP/2 are refused: bytes are read off the raw socket here, so TLS belongs to
the proxy.
"""
from __future__ import annotations

import errno
import re
import selectors
import socket
import tempfile
import time
from functools import partial

from gunicorn.http.body import LengthReader
from gunicorn.http.errors import NoMoreData
from gunicorn.http.message import Request
from gunicorn.http.parser import RequestParser
from gunicorn.http.unreader import IterUnreader, SocketUnreader, Unreader
from gunicorn.workers.gthread import TConn, ThreadWorker

# A request's bytes are kept in memory up to this, then in a temporary file.
SPOOL_MEMORY_BYTES = 256 * 1024
# Bytes taken from a socket per read (an upload arrives in pieces this large).
READ_CHUNK_BYTES = 256 * 1024
# The longest head kept while waiting for its end: more than gunicorn's own bound with
# its default limits (a request line of 8190 bytes, 100 fields of 8190), so it is always
# gunicorn's parser that refuses an oversized head, from bytes already here.
HEAD_LIMIT_BYTES = 1024 * 1024
# The longest a connection may send nothing while a request is partly here (or before a
# new connection's first request), as nginx's client_header_timeout and
# client_body_timeout default to. Between requests, gunicorn's --keep-alive applies.
CLIENT_TIMEOUT_S = 60.0
# Closing: how long to read (and drop) what a client still sends after the response,
# and how much, so that the close does not reset the response (RFC 9112 section 9.6).
LINGER_S = 2.0
LINGER_MAX_BYTES = 64 * 1024

_CHUNK_SIZE = re.compile(rb"[0-9A-Fa-f]+")
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def _recv(conn) -> bytes | None:
    """What a readable socket has (b"": the client is gone), or None if nothing after all."""
    try:
        return conn.sock.recv(READ_CHUNK_BYTES)
    except (BlockingIOError, InterruptedError):
        return None
    except OSError:
        return b""


class _ChunkedEnd:
    """Where a chunked body ends (RFC 9112 section 7.1), fed its bytes as they arrive.

    It only frames; gunicorn's parser checks the chunks when the request is served,
    and the connection is closed if the two disagree on where the request ended.
    """

    def __init__(self, line_limit: int, body_limit: int):
        self.line_limit = line_limit
        self.body_limit = body_limit
        self.skip = 0  # chunk data, and the CRLF after it, still to come
        self.line = bytearray()  # a chunk-size or trailer line, until its LF
        self.trailers = False  # after the last (zero-size) chunk

    def feed(self, data: bytes) -> int | None:
        """How many bytes of `data` end the body, or None if it goes on past them.
        ValueError: not a chunked body (gunicorn's parser will say why)."""
        i = 0
        while i < len(data):
            if self.skip:
                step = min(self.skip, len(data) - i)
                self.skip -= step
                i += step
                continue
            lf = data.find(b"\n", i)
            if lf < 0:
                self.line += data[i:]
                if len(self.line) > self.line_limit:
                    raise ValueError(f"a chunk-size or trailer line over {self.line_limit} bytes")
                return None
            self.line += data[i:lf + 1]
            i = lf + 1
            line = bytes(self.line)
            self.line.clear()
            if self.trailers:
                if line == b"\r\n":  # the empty line that ends the trailer section
                    return i
                continue
            size = line.split(b";", 1)[0].rstrip(b"\r\n \t")
            if not _CHUNK_SIZE.fullmatch(size):
                raise ValueError(f"chunk size {size[:20]!r} is not hexadecimal")
            n = int(size, 16)
            if n > self.body_limit:
                raise ValueError(f"a chunk of {n} bytes, above the {self.body_limit}-byte body limit")
            if n == 0:
                self.trailers = True
            else:
                self.skip = n + 2
        return None


class _SpoolUnreader(Unreader):
    """What a thread's gunicorn parser reads a request from: its bytes in the spool."""

    def __init__(self, spool, length: int, truncated: bool):
        super().__init__()
        spool.seek(0)
        self.spool = spool
        self.left = length
        self.truncated = truncated

    def chunk(self, size_hint=None):
        size = min(self.left, max(size_hint or 0, 8192), SocketUnreader.max_body_chunk)
        data = self.spool.read(size)
        self.left -= len(data)
        return data


class _BufferedRequest(Request):
    def __init__(self, cfg, unreader, peer_addr, req_number=1):
        super().__init__(cfg, unreader, peer_addr, req_number)
        # The main loop answered `Expect: 100-continue` when it began waiting for the
        # body, which is here now: gunicorn would send a second 100 before the response.
        self._expected_100_continue = False
        if unreader.truncated:
            # Handed on before its end (a body over the limit, a malformed head): where
            # the next request would start is not known.
            self.force_close()


class _BufferedParser(RequestParser):
    """A connection's parser, which reads each request from the `_SpoolUnreader` the
    worker gives it (`parser.unreader`) before handing the connection to a thread."""

    mesg_class = _BufferedRequest

    def __init__(self, cfg, client):
        super().__init__(cfg, (), client)


class _Inbox:
    """The bytes of a connection's next request, as the main loop reads them, and
    whether that request is all here (`ready`)."""

    def __init__(self, cfg, peer, body_limit: int):
        self.cfg = cfg
        self.peer = peer
        self.body_limit = body_limit
        self.spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES, prefix="diffqueue-request-")
        self.size = 0  # bytes received
        self.head: bytearray | None = bytearray()  # until the head's end is found
        self.head_size = 0
        self.end: int | None = None  # where the request ends, once known
        self.chunks: _ChunkedEnd | None = None
        self.ready = False
        self.truncated = False  # handed on before its end: the connection closes after it
        self.continue_due = False  # send `100 Continue` now

    def feed(self, data: bytes) -> bool:
        """Take bytes read from the connection; True once the request is to be served."""
        self.size += len(data)
        if self.head is not None:
            searched = max(0, len(self.head) - 3)
            self.head += data
            if not self._head_ended(searched):
                return self._hand_on() if len(self.head) > HEAD_LIMIT_BYTES else False
            if self.ready:  # handed on as it is (see _head_ended)
                return True
            data = bytes(self.head[self.head_size:])
            self.spool.write(self.head)
            self.head = None
        else:
            self.spool.write(data)
        if self.chunks is not None:
            try:
                end = self.chunks.feed(data)
            except ValueError:
                return self._hand_on()
            if end is not None:
                self.end = self.size - len(data) + end
            elif self.size - self.head_size > self.body_limit:
                return self._hand_on()
        self.ready = self.end is not None and self.size >= self.end
        if self.ready:
            self.continue_due = False
        return self.ready

    def _head_ended(self, searched: int) -> bool:
        """Whether the head is all here; if so, where the body ends or how to find it."""
        idx = self.head.find(b"\r\n\r\n", searched)
        while idx >= 0:
            try:
                # Parsed as the thread's gunicorn parser will parse it, so both agree on
                # how long the body is.
                req = Request(self.cfg, IterUnreader([bytes(self.head[:idx + 4])]), self.peer)
            except NoMoreData:  # an empty line before the request line (RFC 9112 section 2.2)
                idx = self.head.find(b"\r\n\r\n", idx + 1)
                continue
            except Exception:
                # A head gunicorn refuses: the thread's parse of the same bytes answers it
                # (400, 431, 501), and then the connection closes.
                self.head_size = len(self.head)
                self._hand_on()
                return True
            self.head_size = idx + 4
            reader = req.body.reader
            if isinstance(reader, LengthReader):
                if reader.length > self.body_limit:
                    self._hand_on()  # the app refuses it (413) from the head alone
                    return True
                self.end = self.head_size + reader.length
            else:  # ChunkedReader (with neither header, gunicorn gives a LengthReader of 0)
                self.chunks = _ChunkedEnd(req.limit_request_field_size, self.body_limit)
            self.continue_due = req.version >= (1, 1) and any(
                name == "EXPECT" and value.strip().lower() == "100-continue" for name, value in req.headers)
            return True
        return False

    def _hand_on(self) -> bool:
        """Serve what is here as it is: the app or gunicorn's parser refuses it."""
        if self.head is not None:
            self.spool.write(self.head)
            self.head = None
        self.end = self.size
        self.ready = self.truncated = True
        self.continue_due = False
        return True

    def reader(self) -> _SpoolUnreader:
        return _SpoolUnreader(self.spool, self.end, self.truncated)

    def next_request(self) -> "_Inbox":
        """The next request's inbox, with the bytes that came after this one."""
        following = _Inbox(self.cfg, self.peer, self.body_limit)
        self.spool.seek(self.end)
        rest = self.spool.read(self.size - self.end)
        if rest:
            following.feed(rest)
        return following

    def close(self) -> None:
        self.spool.close()


class BufferedThreadWorker(ThreadWorker):
    """gunicorn's gthread worker whose main loop reads each request whole before a
    thread serves it (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.waiting: set[TConn] = set()  # registered with the poller: reading a request, or closing
        self.body_limit = 0

    @classmethod
    def check_config(cls, cfg, log):
        super().check_config(cfg, log)
        if cfg.is_ssl or cfg.http2_cleartext != "off":
            raise RuntimeError(f"{cls.__name__} reads plain HTTP/1.1 off the socket: terminate TLS and HTTP/2 "
                               "at the proxy (certfile and http2_cleartext must be unset)")

    def load_wsgi(self):
        super().load_wsgi()
        from web.limits import MULTIPART_SLACK

        self.body_limit = self.wsgi.extensions["diffqueue"].settings.upload_max_bytes + MULTIPART_SLACK

    # ------------------------------------------------------------ reading
    def accept(self, listener):
        try:
            sock, client = listener.accept()
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.ECONNABORTED, errno.EWOULDBLOCK):
                raise
            return
        self.nr_conns += 1
        conn = TConn(self.cfg, sock, client, listener.getsockname())
        # What a thread reads is here already: it must not wait for the socket either.
        conn.data_ready = True
        conn.parser = _BufferedParser(self.cfg, client)
        conn.inbox = _Inbox(self.cfg, client, self.body_limit)
        self._wait(conn, CLIENT_TIMEOUT_S, self._on_readable)

    def _wait(self, conn, timeout_s: float, callback) -> None:
        conn.sock.setblocking(False)
        conn.timeout = time.monotonic() + timeout_s
        self.waiting.add(conn)
        self.poller.register(conn.sock, selectors.EVENT_READ, partial(callback, conn))

    def _unwait(self, conn) -> None:
        self.waiting.discard(conn)
        try:
            self.poller.unregister(conn.sock)
        except (KeyError, ValueError):
            pass

    def _on_readable(self, conn, _sock) -> None:
        data = _recv(conn)
        if data is None:
            return
        if not data:  # the client went away before its request was all here
            self._close(conn)
            return
        conn.timeout = time.monotonic() + CLIENT_TIMEOUT_S
        try:
            ready = conn.inbox.feed(data)
        except Exception:
            self.log.exception("Error buffering a request from %s", conn.client)
            self._close(conn)
            return
        if ready:
            self._unwait(conn)
            self._dispatch(conn)
        elif conn.inbox.continue_due:
            conn.inbox.continue_due = False
            try:
                conn.sock.send(_CONTINUE)  # 25 bytes into an idle socket's send buffer
            except OSError:
                pass  # the client sends its body after its own wait for the 100 (curl: 1 s)

    def _dispatch(self, conn) -> None:
        conn.parser.unreader = conn.inbox.reader()
        self.enqueue_req(conn)

    def finish_request(self, conn, fs):
        """A thread has served a request: wait for the next one, serve an already
        received one, or close."""
        try:
            keepalive = not fs.cancelled() and fs.result()
            inbox, unreader = conn.inbox, conn.parser.unreader
            # gunicorn's parser took exactly the bytes framed here as this request: the
            # two agreed on where it ended, so the next one starts where the inbox says.
            agreed = unreader.left == 0 and not unreader.buf.getvalue()
            if keepalive and agreed and not inbox.truncated:
                conn.inbox = inbox.next_request()
                inbox.close()
                if conn.inbox.ready:
                    self._dispatch(conn)
                elif conn.inbox.size:
                    self._wait(conn, CLIENT_TIMEOUT_S, self._on_readable)
                else:
                    self._wait(conn, self.cfg.keepalive, self._on_readable)
            else:
                self._close_lingering(conn)
        except Exception:
            self.log.exception("Error after a request from %s", conn.client)
            self._close(conn)

    # ------------------------------------------------------------ closing
    def _close_lingering(self, conn) -> None:
        """Half-close, then drop what the client still sends until it closes: closing a
        socket with unread bytes resets the connection, which can destroy the response
        before the client has read it. gunicorn's close_graceful does this by blocking
        for up to 2 s; here the poller waits instead of the loop."""
        conn.inbox.close()
        conn.lingered = 0
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._close(conn)
            return
        self._wait(conn, LINGER_S, self._on_lingering_readable)

    def _on_lingering_readable(self, conn, _sock) -> None:
        data = _recv(conn)
        if data is None:
            return
        conn.lingered += len(data)
        if not data or conn.lingered > LINGER_MAX_BYTES:
            self._close(conn)

    def _close(self, conn) -> None:
        self._unwait(conn)
        conn.inbox.close()
        self.nr_conns -= 1
        conn.close()

    def murder_pending(self):
        """Close connections silent past their timeout (called by gthread's loop every
        second at most, also while stopping)."""
        super().murder_pending()
        now = time.monotonic()
        for conn in [c for c in self.waiting if c.timeout <= now]:
            self._close(conn)

    def _cap_keepalive(self, deadline):
        """Stopping: idle connections close by `deadline`; a request partly here may
        still arrive (within gunicorn's graceful timeout) and is answered, with
        `Connection: close`."""
        super()._cap_keepalive(deadline)
        for conn in self.waiting:
            if not conn.inbox.size:
                conn.timeout = min(conn.timeout, deadline)
