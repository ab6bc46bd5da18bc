"""A local stand-in for the plan's Slack channel: an HTTP server on loopback appending every POSTed JSON body to a
JSON-lines file (cli/serve.py points the plan's notification block at it). Standard library only.

    python -m deployments.receiver PORT FILE
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def make_server(port: int, out: Path) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:`port` recording each POST body as one line of `out`."""
    lock = threading.Lock()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            try:
                record = json.loads(body)
            except ValueError:
                record = {"raw": body.decode(errors="replace")}
            with lock, out.open("a") as f:
                f.write(json.dumps(record) + "\n")
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args) -> None:  # one line per request on stderr is noise here
            pass

    return ThreadingHTTPServer(("127.0.0.1", port), Handler)


def received(out: Path) -> list[dict]:
    return [json.loads(line) for line in out.read_text().splitlines()] if out.is_file() else []


if __name__ == "__main__":
    make_server(int(sys.argv[1]), Path(sys.argv[2])).serve_forever()
