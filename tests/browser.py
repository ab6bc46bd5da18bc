"""Headless Chromium for tests that look at a page: where it is (a missing browser skips, or fails under CI=true:
`make test` installs it), and a small Chrome DevTools Protocol driver for pages that need clicks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers import free_ports


def chromium() -> str:
    """The chromium binary; skips the test when missing (fails it under CI=true, where `make test` installs it)."""
    found = shutil.which("chromium")
    if found:
        return found
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: make test installs it (apt-get install chromium) when run as root")
    pytest.skip("chromium is not installed: apt-get install -y chromium (make test does, as root)")


class Page:
    """One tab, driven over the DevTools websocket: evaluate JavaScript, wait for a condition."""

    def __init__(self, websocket_url: str) -> None:
        from websockets.sync.client import connect

        self._ws = connect(websocket_url, max_size=50_000_000)
        self._next = 0
        self.console_errors: list[str] = []
        self.call("Runtime.enable")
        self.call("Page.enable")

    def call(self, method: str, **params: Any) -> dict:
        self._next += 1
        self._ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        while True:
            message = json.loads(self._ws.recv())
            if message.get("method") == "Runtime.exceptionThrown":
                self.console_errors.append(message["params"]["exceptionDetails"].get("text", "exception"))
            if message.get("id") == self._next:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def js(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise RuntimeError(f"{expression[:80]}: {result['exceptionDetails'].get('text')}")
        return result["result"].get("value")

    def wait(self, expression: str, timeout: float = 60, what: str = "") -> Any:
        """Poll `expression` until it is truthy; its value."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.js(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what or expression}")
            time.sleep(0.3)

    def close(self) -> None:
        self._ws.close()


@contextmanager
def browser(profile: Path) -> Iterator[Page]:
    """Headless Chromium with remote debugging on a free loopback port; yields its first tab; stops it after."""
    port = free_ports(1)[0]
    process = subprocess.Popen([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                "--window-size=1280,1000", f"--remote-debugging-port={port}",
                                f"--user-data-dir={profile}", "about:blank"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    page = None
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                tabs = httpx.get(f"http://127.0.0.1:{port}/json", timeout=2).json()
                break
            except httpx.HTTPError:
                assert process.poll() is None and time.monotonic() < deadline, "chromium did not start"
                time.sleep(0.2)
        page = Page(next(t for t in tabs if t["type"] == "page")["webSocketDebuggerUrl"])
        yield page
    finally:
        if page is not None:
            page.close()
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
