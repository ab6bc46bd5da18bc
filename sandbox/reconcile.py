"""The loop of the sandbox's controllers (node groups, kubelet): reconcile every interval until stopped; an error
(moto or the Kubernetes API away or restarting) is logged once until it changes, and retried on the next round."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable


def reconcile_until(stop: threading.Event, interval: float, reconcile: Callable[[], None], log: logging.Logger,
                    what: str) -> None:
    """Call `reconcile` every `interval` seconds until `stop` is set (`what`: what the warnings say it reconciles)."""
    last_error: str | None = None
    while not stop.is_set():
        try:
            reconcile()
        except Exception as exc:  # noqa: BLE001 - the API away: keep what runs, retry on the next round
            text = f"{type(exc).__name__}: {(str(exc).strip().splitlines() or [''])[0][:200]}"
            if text != last_error:
                log.warning("cannot reconcile%s, retrying: %s", what, text)
            last_error = text
        else:
            if last_error is not None:
                log.info("reconciling again")
            last_error = None
        stop.wait(interval)
