"""Reading a result longer than one page, with `limit` and `offset`.

The server answers at most 200 items per request (422 above that), so every listing that can
be longer walks pages: this module is the one place that does it.

    runs = await collect(client.read_flow_runs,
                         FlowRunFilter(states=[StateType.RUNNING], pool="my-pool").body())

    async for page in paginate(client.read_flow_runs,
                               FlowRunFilter(states=[StateType.CANCELLING], pool="my-pool",
                                             sort="ID_DESC").body()):
        ...  # act on each page as it arrives

`fetch` is any endpoint that takes a filter body and returns a list (`read_flow_runs`,
`read_task_runs`). The helpers own `limit` and `offset`: whatever the body says about them is
replaced. A page shorter than asked for is the last; `max_items` stops early, asking the last
page for no more than it still needs. Pages are read one after another, so a result that
changes meanwhile (runs changing state) may skip or repeat an item, as any offset paging does:
give a stable `sort` when that matters.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any, TypeVar

T = TypeVar("T")

#: The most items the server answers per request.
PAGE_SIZE = 200

Fetch = Callable[[dict[str, Any]], Awaitable[list[T]]]


async def paginate(
    fetch: Fetch[T],
    body: Mapping[str, Any],
    *,
    page_size: int = PAGE_SIZE,
    max_items: int | None = None,
) -> AsyncIterator[list[T]]:
    """Yield each page of `fetch(body)` in turn (never an empty one), until the last."""
    if page_size < 1:
        raise ValueError("page_size must be at least 1")
    offset = 0
    while max_items is None or offset < max_items:
        limit = page_size if max_items is None else min(page_size, max_items - offset)
        page = await fetch({**body, "limit": limit, "offset": offset})
        if page:
            yield page
        if len(page) < limit:
            return
        offset += limit


async def collect(
    fetch: Fetch[T],
    body: Mapping[str, Any],
    *,
    page_size: int = PAGE_SIZE,
    max_items: int | None = None,
) -> list[T]:
    """Every item of `fetch(body)` (at most `max_items`), in the server's order."""
    items: list[T] = []
    async for page in paginate(fetch, body, page_size=page_size, max_items=max_items):
        items += page
    return items
