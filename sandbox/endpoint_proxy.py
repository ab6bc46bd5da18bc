"""A stable TCP endpoint in front of a server that may move: the sandbox's RDS endpoint (`Endpoint.Address:Port`).

RDS keeps an instance's endpoint when a Multi-AZ failover moves it to the standby; clients see their connections
drop and reconnect to the same name. `EndpointProxy` does that on loopback: it listens on its own port and pipes
each connection to the current backend (`route(port)`); `route(None)` (instance stopped, rebooting, cut off)
refuses new connections, and any change of route drops the connections made through the old one.
"""

from __future__ import annotations

import logging
import selectors
import socket
import threading

log = logging.getLogger("sandbox.endpoint_proxy")
HOST = "127.0.0.1"


class EndpointProxy:
    def __init__(self, name: str, port: int = 0):
        self.name = name
        self._listener = socket.create_server((HOST, port), reuse_port=False)
        self.port: int = self._listener.getsockname()[1]
        self._backend: int | None = None
        self._lock = threading.Lock()
        self._open: set[socket.socket] = set()
        self._closed = False
        threading.Thread(target=self._accept, name=f"endpoint-{name}", daemon=True).start()

    @property
    def backend(self) -> int | None:
        return self._backend

    def route(self, port: int | None) -> None:
        """Send new connections to `port` (None: refuse them) and drop the connections made before."""
        with self._lock:
            if port == self._backend:
                return
            self._backend = port
            dropped, self._open = self._open, set()
        for sock in dropped:
            _close(sock)
        log.info("endpoint %s (:%d) -> %s", self.name, self.port, f":{port}" if port else "refusing connections")

    def close(self) -> None:
        self._closed = True
        self.route(None)
        _close(self._listener)

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            backend = self._backend
            if backend is None:
                _close(client)
                continue
            try:
                server = socket.create_connection((HOST, backend), timeout=5)
            except OSError:
                _close(client)
                continue
            server.settimeout(None)
            with self._lock:
                if self._backend != backend:  # re-routed while connecting
                    _close(client)
                    _close(server)
                    continue
                self._open |= {client, server}
            threading.Thread(target=self._pipe, args=(client, server), daemon=True).start()

    def _pipe(self, client: socket.socket, server: socket.socket) -> None:
        pair = {client: server, server: client}
        with selectors.DefaultSelector() as selector:
            for sock in pair:
                selector.register(sock, selectors.EVENT_READ)
            try:
                while True:
                    for key, _ in selector.select():
                        data = key.fileobj.recv(65536)
                        if not data:
                            return
                        pair[key.fileobj].sendall(data)
            except (OSError, ValueError):
                return
            finally:
                with self._lock:
                    self._open -= {client, server}
                _close(client)
                _close(server)


def _close(sock: socket.socket) -> None:
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass
    sock.close()
