"""Prometheus metrics for one worker, in a registry of its own (so tests can read them)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENESS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900)


class Metrics:
    """Every metric flowhand exports; labels `pool` and `backend` say which worker."""

    def __init__(self, pool: str, backend: str) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        labels = {"pool": pool, "backend": backend}
        self._labels = labels
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
        self.in_flight = Gauge(
            "flowhand_runs_in_flight", "Runs this worker is handling (claiming, running, "
            "reporting).", ["pool", "backend"], registry=self.registry).labels(**labels)
        self.free_slots = Gauge(
            "flowhand_free_slots", "Runs this worker may still take under its limit (200 when "
            "unlimited: one poll's maximum).", ["pool", "backend"],
            registry=self.registry).labels(**labels)
        self.poll_duration = Histogram(
            "flowhand_poll_duration_seconds", "Time of one get_scheduled_flow_runs call.",
            ["pool", "backend"], registry=self.registry).labels(**labels)
        self.lateness = Histogram(
            "flowhand_start_lateness_seconds", "Infrastructure start time minus the run's "
            "scheduled time.", ["pool", "backend"], buckets=_LATENESS_BUCKETS,
            registry=self.registry).labels(**labels)
        self.last_poll = Gauge(
            "flowhand_last_successful_poll_timestamp_seconds", "Unix time of the last "
            "successful poll.", ["pool", "backend"], registry=self.registry).labels(**labels)
        self.event_stream_open = Gauge(
            "flowhand_event_stream_open", "1 while the server's event stream is open (runs "
            "are picked up as they fall due, polls are a slow safety net), else 0.",
            ["pool", "backend"], registry=self.registry).labels(**labels)
        self.api_errors = Counter(
            "flowhand_api_errors", "Failed API calls of the worker loops by kind: transport, "
            "auth, not_found, status, response.", ["pool", "backend", "kind"],
            registry=self.registry)

        self.events_sent = Counter(
            "flowhand_events_sent", "Prefect events (prefect.worker.*) the API accepted.",
            ["pool", "backend"], registry=self.registry).labels(**labels)
        self.output_dropped = Counter(
            "flowhand_output_dropped_bytes", "Bytes of run output read but dropped because "
            "they could not be passed on (flowhand's stdout failed).", ["pool", "backend"],
            registry=self.registry).labels(**labels)
        self.events_dropped = Counter(
            "flowhand_events_dropped", "Prefect events given up: the buffer was full while the "
            "API was unreachable, or the API refused them.", ["pool", "backend"],
            registry=self.registry).labels(**labels)

    def run_event(self, event: str) -> None:
        self.flow_runs.labels(event=event, **self._labels).inc()

    def claim(self, outcome: str) -> None:
        self.claims.labels(outcome=outcome, **self._labels).inc()

    def api_error(self, kind: str) -> None:
        self.api_errors.labels(kind=kind, **self._labels).inc()
