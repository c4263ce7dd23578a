"""Real webhook receivers for tests, on 127.0.0.1 in threads: an HTTP(S) server, and
one that trickles its answer forever."""
from __future__ import annotations

import itertools
import json
import socket
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Receiver:
    """A real HTTP server that records each POST (headers, raw body) and answers the
    statuses in `script` first, then 200."""

    def __init__(self, script: list[int] | None = None, certfile: str | None = None):
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.script = list(script or [])
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                receiver.received.append((dict(self.headers), body))
                status = receiver.script.pop(0) if receiver.script else 200
                reply = b"ok" if status < 300 else b"down for maintenance"
                self.send_response(status)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args):  # keep pytest's output clean
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        if certfile:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(certfile)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.port = self.server.server_address[1]
        self.url = f"http://127.0.0.1:{self.port}/hook?source=diffqueue"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def events(self) -> list[str]:
        return [json.loads(body)["event"] for _, body in self.received]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


class Trickler:
    """A receiver that never finishes answering: it reads the request, then sends its
    response one byte every `interval_s`, forever. A per-read timeout never trips on it;
    only a deadline on the whole response ends the send."""

    RESPONSE = b"HTTP/1.1 200 OK\r\nX-Trickle: "

    def __init__(self, interval_s: float = 1.0, certfile: str | None = None):
        self.interval_s = interval_s
        self._tls = None
        if certfile:
            self._tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            self._tls.load_cert_chain(certfile)
        self.connections = 0  # how many connections reached it
        self.hung_up = 0  # how many of them the sender closed
        self._closing = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/slow"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closing.is_set():
            try:
                conn, _ = self._listener.accept()
            except OSError:  # the listener was closed
                return
            self.connections += 1
            threading.Thread(target=self._trickle, args=(conn,), daemon=True).start()

    def _trickle(self, conn: socket.socket):
        if self._tls:
            try:
                conn = self._tls.wrap_socket(conn, server_side=True)
            except OSError:  # a client that refused the certificate
                conn.close()
                return
        with conn:
            conn.recv(65536)  # the request (small enough for one read here)
            reply = itertools.chain(self.RESPONSE, itertools.repeat(ord(".")))
            while not self._closing.wait(self.interval_s):
                try:
                    conn.sendall(bytes([next(reply)]))
                except OSError:
                    self.hung_up += 1
                    return

    def close(self):
        self._closing.set()
        self._listener.close()
