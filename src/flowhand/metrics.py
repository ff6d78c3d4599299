"""Prometheus metrics for one worker, in a registry of its own (so tests can read them)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

#: The counts of a backend's own events by (event, reason) (`BackendReports.counts`).
BackendCounts = Callable[[], Mapping[tuple[str, str], int]]

_LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900)


class Metrics:
    """Every metric flowhand exports; labels `pool` and `backend` say which worker."""

    def __init__(self, pool: str, backend: str, backend_counts: BackendCounts | None = None
                 ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"pool": pool, "backend": backend}
        self._labels = labels
        if backend_counts is not None:
            self.registry.register(_BackendEvents(labels, backend_counts))
        self.flow_runs = Counter(
            "flowhand_flow_runs", "Flow runs by what happened to them: claimed, started, "
            "completed (by the flow), failed (by the flow), crashed, retried, cancelled, "
            "handed_back, reattached, taken_over (a lost worker's claim handed back), "
            "final_restored (a re-opened finished run put back), fenced (a claim found lost "
            "before its start).",
            ["pool", "backend", "event"], registry=self.registry)
        self.claims = Counter(
            "flowhand_claims", "Answers to PENDING proposals: ACCEPT, REJECT, ABORT, WAIT.",
            ["pool", "backend", "outcome"], registry=self.registry)
        self._loop_metrics()
        self._delivery_metrics()

    def _loop_metrics(self) -> None:
        """The worker loop's metrics: runs in flight, free slots, polls, lateness, API errors."""
        self.in_flight = self._gauge(
            "flowhand_runs_in_flight", "Runs this worker is handling (claiming, running, "
            "reporting).")
        self.free_slots = self._gauge(
            "flowhand_free_slots", "Runs this worker may still take under its limit (200 when "
            "unlimited: one poll's maximum).")
        self.poll_duration = Histogram(
            "flowhand_poll_duration_seconds", "Time of one get_scheduled_flow_runs call.",
            ["pool", "backend"], registry=self.registry).labels(**self._labels)
        self.lateness = Histogram(
            "flowhand_start_lateness_seconds", "Infrastructure start time minus the run's "
            "scheduled time.", ["pool", "backend"], buckets=_LATENESS_BUCKETS,
            registry=self.registry).labels(**self._labels)
        self.last_poll = self._gauge(
            "flowhand_last_successful_poll_timestamp_seconds", "Unix time of the last "
            "successful poll.")
        self.event_stream_open = self._gauge(
            "flowhand_event_stream_open", "1 while the server's event stream is open (runs "
            "are picked up as they fall due, polls are a slow safety net), else 0.")
        self.api_errors = Counter(
            "flowhand_api_errors", "Failed API calls of the worker loops by kind: transport, "
            "auth, not_found, status, response.", ["pool", "backend", "kind"],
            registry=self.registry)
        self.api_waits = Counter(
            "flowhand_api_waits", "Waits before an API request was sent again, by reason: "
            "rate_limited (429), unavailable (502/503/504/408), maintenance, transport, csrf "
            "(a token renewed).", ["pool", "backend", "reason"], registry=self.registry)

    def _delivery_metrics(self) -> None:
        """What was sent on, or dropped: events and run output."""
        self.events_sent = self._counter(
            "flowhand_events_sent", "Prefect events (prefect.worker.*) the API accepted.")
        self.output_dropped = self._counter(
            "flowhand_output_dropped_bytes", "Bytes of run output read but dropped because "
            "they could not be passed on (flowhand's stdout failed).")
        self.events_dropped = self._counter(
            "flowhand_events_dropped", "Prefect events given up: the buffer was full while the "
            "API was unreachable, or the API refused them.")

    def _gauge(self, name: str, documentation: str) -> Gauge:
        gauge: Gauge = Gauge(name, documentation, ["pool", "backend"],
                             registry=self.registry).labels(**self._labels)
        return gauge

    def _counter(self, name: str, documentation: str) -> Counter:
        counter: Counter = Counter(name, documentation, ["pool", "backend"],
                                   registry=self.registry).labels(**self._labels)
        return counter

    def run_event(self, event: str) -> None:
        self.flow_runs.labels(event=event, **self._labels).inc()

    def claim(self, outcome: str) -> None:
        self.claims.labels(outcome=outcome, **self._labels).inc()

    def api_wait(self, reason: str) -> None:
        self.api_waits.labels(reason=reason, **self._labels).inc()

    def api_error(self, kind: str) -> None:
        self.api_errors.labels(kind=kind, **self._labels).inc()


class _BackendEvents(Collector):
    """`flowhand_backend_events_total{event, reason}`: what the backend counted itself, e.g.
    event `warm_start_forked`, or `warm_start_fallback` with the reason (memory,
    unproven_prefect, max_helpers, backoff, helper_failed)."""

    def __init__(self, labels: dict[str, str], counts: BackendCounts) -> None:
        self._labels = labels
        self._counts = counts

    def collect(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "flowhand_backend_events", "Events a backend counted itself by event and reason: "
            "warm_start_forked, warm_start_fallback (reason: memory, unproven_prefect, "
            "max_helpers, backoff, helper_failed, retired).",
            labels=["pool", "backend", "event", "reason"])
        for (event, reason), value in sorted(self._counts().items()):
            family.add_metric([self._labels["pool"], self._labels["backend"], event, reason],
                              value)
        yield family
