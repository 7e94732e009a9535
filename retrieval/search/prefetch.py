"""Batches of work loaded one step ahead in a thread: while the caller embeds one batch of
images, the next one is decoded (Pillow's decoders release the GIL)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

__all__ = ["chunks", "prefetched"]


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """Consecutive slices of ``items`` of ``size`` (the last one shorter); none when empty."""
    for start in range(0, len(items), size):
        yield items[start : start + size]


def prefetched(batches: Iterable[Any], load: Callable[[Any], Any]) -> Iterator[Any]:
    """``load(batch)`` of each batch in order, the next one loaded in a thread while the
    caller works on the current one: decoding (which releases the GIL) overlaps embedding.
    An error of ``load`` is raised where its batch would have been yielded."""
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="retrieval-load") as pool:
        pending: Future[Any] | None = None
        for batch in batches:
            upcoming = pool.submit(load, batch)
            if pending is not None:
                yield pending.result()
            pending = upcoming
        if pending is not None:
            yield pending.result()
