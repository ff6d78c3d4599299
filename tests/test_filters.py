"""The filter builder writes the bodies the server expects, and the paginator walks limit/offset
pages to the end: fast unit tests against an in-memory API (httpx.MockTransport)."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import anyio
import pytest

from flowhand import status
from flowhand.api.client import PrefectClient
from flowhand.api.filters import FlowRunFilter, TaskRunFilter
from flowhand.api.models import StateType
from flowhand.api.pagination import collect, paginate
from flowhand.errors import APIStatusError
from tests.fake_api import FakeAPI

T = TypeVar("T")
WHEN = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
RUN_ID = uuid.UUID("00000000-0000-0000-0000-000000000001")


def fake_runs(count: int, fail_at_offset: int | None = None) -> FakeAPI:
    """The in-memory API holding `count` RUNNING flow runs named run-0, run-1, ..., in order;
    the page at `fail_at_offset` fails."""
    api = FakeAPI()
    for i in range(count):
        api.add_run("RUNNING", run_name=f"run-{i}")
    api.fail_filter_at_offset = fail_at_offset
    return api


def with_client(api: FakeAPI, use: Callable[[PrefectClient], Awaitable[T]]) -> T:
    """`use` a client of the in-memory API; every request it sent is a POST /flow_runs/filter."""
    async def main() -> T:
        async with PrefectClient("http://127.0.0.1:9/api", transport=api.transport(),
                                 max_retries=0) as client:
            return await use(client)

    try:
        return anyio.run(main)
    finally:
        assert set(api.requests) <= {("POST", "/flow_runs/filter")}, api.requests


def test_flow_run_filter_writes_the_nested_conditions() -> None:
    """Every field becomes the server's nested form; unset fields add nothing."""
    body = FlowRunFilter(
        ids=[RUN_ID], states=[StateType.CANCELLED], ended_after=WHEN,
        next_scheduled_before=WHEN, pool="pool-a", queues=["q1", "q2"], sort="ID_DESC",
        limit=50, offset=100,
    ).body()
    assert body == {
        "flow_runs": {"id": {"any_": [str(RUN_ID)]},
                      "state": {"type": {"any_": ["CANCELLED"]}},
                      "end_time": {"after_": WHEN.isoformat()},
                      "next_scheduled_start_time": {"before_": WHEN.isoformat()}},
        "work_pools": {"name": {"any_": ["pool-a"]}},
        "work_pool_queues": {"name": {"any_": ["q1", "q2"]}},
        "sort": "ID_DESC", "limit": 50, "offset": 100,
    }
    assert FlowRunFilter().body() == {}
    assert FlowRunFilter(pool="p").body() == {"work_pools": {"name": {"any_": ["p"]}}}


def test_flow_run_filter_matches_the_bodies_written_by_hand_before() -> None:
    """The worker's cancellation and late-run queries come out as they were written by hand."""
    cancelling = FlowRunFilter(states=[StateType.CANCELLING], pool="p", sort="ID_DESC",
                               limit=200, offset=0).body()
    assert cancelling == {"flow_runs": {"state": {"type": {"any_": ["CANCELLING"]}}},
                          "work_pools": {"name": {"any_": ["p"]}},
                          "sort": "ID_DESC", "limit": 200, "offset": 0}
    late = FlowRunFilter(states=[StateType.SCHEDULED], next_scheduled_before=WHEN, pool="p",
                         queues=["default"]).body()
    assert late == {"flow_runs": {"state": {"type": {"any_": ["SCHEDULED"]}},
                                  "next_scheduled_start_time": {"before_": WHEN.isoformat()}},
                    "work_pools": {"name": {"any_": ["p"]}},
                    "work_pool_queues": {"name": {"any_": ["default"]}}}


def test_an_empty_list_is_a_condition_and_none_is_not() -> None:
    """`states=[]` asks for runs in no state (any_: []), as the server reads it; None asks
    nothing about states."""
    assert FlowRunFilter(states=[]).body() == {"flow_runs": {"state": {"type": {"any_": []}}}}
    assert FlowRunFilter(states=None, queues=None).body() == {}


def test_task_run_filter() -> None:
    """Task runs of one flow run in some states, with the page fields."""
    body = TaskRunFilter(flow_run_ids=[RUN_ID], states=[StateType.PENDING, StateType.RUNNING],
                         sort="ID_DESC", limit=200).body()
    assert body == {"task_runs": {"flow_run_id": {"any_": [str(RUN_ID)]},
                                  "state": {"type": {"any_": ["PENDING", "RUNNING"]}}},
                    "sort": "ID_DESC", "limit": 200}
    assert TaskRunFilter().body() == {}


def test_collect_walks_every_page_and_keeps_the_body() -> None:
    """450 runs come back in order from three requests of 200, 200 and 200 at offsets 0, 200,
    400; the filter is sent unchanged and any limit or offset in it is replaced."""
    api = fake_runs(450)
    body = FlowRunFilter(pool="p", sort="ID_DESC", limit=5, offset=7).body()
    runs = with_client(api, lambda client: collect(client.read_flow_runs, body))
    assert [r.name for r in runs] == [f"run-{i}" for i in range(450)]
    assert api.pages() == [(200, 0), (200, 200), (200, 400)]
    assert all(b["work_pools"] == {"name": {"any_": ["p"]}} and b["sort"] == "ID_DESC"
               for b in api.filter_bodies)
    assert body["limit"] == 5 and body["offset"] == 7, "the caller's body is not modified"


def test_a_full_last_page_costs_one_more_request_and_no_empty_page() -> None:
    """With exactly 400 runs the third request finds nothing, and paginate yields only the two
    full pages."""
    api = fake_runs(400)

    async def pages(client: PrefectClient) -> list[int]:
        return [len(page) async for page in paginate(client.read_flow_runs, {})]

    assert with_client(api, pages) == [200, 200]
    assert api.pages() == [(200, 0), (200, 200), (200, 400)]


def test_max_items_asks_the_last_page_for_no_more_than_it_needs() -> None:
    """max_items=250 reads 200 then 50; max_items=0 sends nothing."""
    api = fake_runs(1000)
    runs = with_client(api, lambda client: collect(client.read_flow_runs, {}, max_items=250))
    assert len(runs) == 250 and runs[-1].name == "run-249"
    assert api.pages() == [(200, 0), (50, 200)]
    api.filter_bodies.clear()
    assert with_client(api, lambda client: collect(client.read_flow_runs, {}, max_items=0)) == []
    assert api.filter_bodies == []


def test_page_size_and_an_empty_result() -> None:
    """A smaller page size pages accordingly; no runs at all is one request and no page."""
    api = fake_runs(25)
    runs = with_client(api, lambda client: collect(client.read_flow_runs, {}, page_size=10))
    assert len(runs) == 25 and api.pages() == [(10, 0), (10, 10), (10, 20)]
    empty = fake_runs(0)
    assert with_client(empty, lambda client: collect(client.read_flow_runs, {})) == []
    assert empty.pages() == [(200, 0)]
    with pytest.raises(ValueError, match="page_size"):
        with_client(empty, lambda client: collect(client.read_flow_runs, {}, page_size=0))


def test_an_error_on_a_later_page_is_raised() -> None:
    """A failing second page raises the API error rather than returning half a result."""
    api = fake_runs(450, fail_at_offset=200)
    with pytest.raises(APIStatusError, match="500"):
        with_client(api, lambda client: collect(client.read_flow_runs, {}))
    assert api.pages() == [(200, 0), (200, 200)]


def test_status_reads_in_flight_then_recently_finished_runs_of_the_pool() -> None:
    """`flowhand status` asks for the pool's in-flight runs oldest first and its finished runs
    newest first, each paged up to the row limit."""
    api = fake_runs(300)
    for i in range(300):
        api.add_run("COMPLETED", run_name=f"done-{i}")
    before = datetime.now(UTC)
    rows = with_client(api, lambda client: status.collect(client, "pool-a", 30, limit=250))
    assert len(rows) == 500
    assert api.pages() == [(200, 0), (50, 200), (200, 0), (50, 200)]
    active, done = api.filter_bodies[0], api.filter_bodies[2]
    assert active["work_pools"] == done["work_pools"] == {"name": {"any_": ["pool-a"]}}
    assert active["sort"] == "EXPECTED_START_TIME_ASC" and done["sort"] == "END_TIME_DESC"
    assert active["flow_runs"] == {"state": {"type": {"any_": ["PENDING", "RUNNING",
                                                               "CANCELLING"]}}}
    assert done["flow_runs"]["state"] == {"type": {"any_": ["COMPLETED", "FAILED", "CANCELLED",
                                                            "CRASHED"]}}
    since = datetime.fromisoformat(done["flow_runs"]["end_time"]["after_"])
    assert before - timedelta(minutes=30, seconds=5) < since <= datetime.now(UTC)
