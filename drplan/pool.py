"""Many independent calls at once, never more than a bound: each item's result or its exception."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

Item = TypeVar("Item", bound=Hashable)
Result = TypeVar("Result")


def bounded_map(call: Callable[[Item], Result], items: Iterable[Item], workers: int
                ) -> dict[Item, Result | Exception]:
    """`call` on every item, at most `workers` at a time; item -> its result, or the exception it raised (one
    failing item does not stop the others). Items are distinct (a dict's keys)."""
    items = list(dict.fromkeys(items))
    if not items:
        return {}

    def guarded(item: Item) -> Result | Exception:
        try:
            return call(item)
        except Exception as exc:  # returned, for the caller to report against its item
            return exc

    with ThreadPoolExecutor(min(workers, len(items)), thread_name_prefix="bounded") as pool:
        return dict(zip(items, pool.map(guarded, items), strict=True))
