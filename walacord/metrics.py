"""Every Prometheus metric walacord exports, declared in one place.

`Metrics(registry)` registers them on the registry it is given, so each test and each
daemon instance gets its own. Names follow Prometheus conventions: the `walacord_`
prefix, base units, `_total` on counters and labels with a bounded set of values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from walacord import __version__

PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The daemon's metrics, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

        # --- process and lifecycle ----------------------------------------------
        self.build_info = Gauge(
            "walacord_build_info", "Always 1; the label carries the walacord version.",
            ["version"], registry=registry)
        self.build_info.labels(version=__version__).set(1)
        self.up = Gauge("walacord_up", "1 while every component has started.", registry=registry)
        self.log_lines_dropped = Counter(
            "walacord_log_lines_dropped_total",
            "Log lines dropped because the writer queue was full.", registry=registry)
        self.config_reloads = Counter(
            "walacord_config_reloads_total", "Configuration reloads by result.",
            ["result"], registry=registry)
        self.watchdog_stalls = Counter(
            "walacord_watchdog_stalls_total",
            "Times a component missed its progress deadline and held back the watchdog.",
            ["component"], registry=registry)

        # --- outbox ---------------------------------------------------------------
        self.outbox_pending = Gauge(
            "walacord_outbox_pending_operations",
            "Operations accepted and not yet applied (pending or in flight).", registry=registry)
        self.outbox_oldest_pending_age = Gauge(
            "walacord_outbox_oldest_pending_age_seconds",
            "Age of the oldest operation not yet applied; 0 when none.", registry=registry)
        self.outbox_synced = Counter(
            "walacord_outbox_synced_total", "Operations applied to their sink.",
            ["sink"], registry=registry)
        self.outbox_dead = Gauge(
            "walacord_outbox_dead_operations",
            "Operations that failed permanently and wait for an operator.", registry=registry)
        self.outbox_enqueued = Counter(
            "walacord_outbox_enqueued_total",
            "Operations accepted into the outbox (duplicates of a known key not counted).",
            registry=registry)
        self.outbox_rejected = Counter(
            "walacord_outbox_rejected_total", "Enqueues rejected, by reason.",
            ["reason"], registry=registry)
        self.outbox_accepted = Gauge(
            "walacord_outbox_accepted_operations",
            "Operations ever accepted, from the outbox's persistent counter.", registry=registry)
        self.outbox_accounted = Gauge(
            "walacord_outbox_accounted_operations",
            "Sum of done, pending, in-flight, dead and dropped operations; equals accepted.",
            registry=registry)
        self.outbox_conservation_ok = Gauge(
            "walacord_outbox_conservation_ok",
            "1 when accepted equals the sum over states at the last check, else 0.",
            registry=registry)
        self.outbox_conservation_failures = Counter(
            "walacord_outbox_conservation_failures_total",
            "Conservation checks where accepted differed from the sum over states.",
            registry=registry)
        self.outbox_sync_errors = Counter(
            "walacord_outbox_sync_errors_total", "Failed sink calls, by sink and reason.",
            ["sink", "reason"], registry=registry)
        self.outbox_batch_size = Gauge(
            "walacord_outbox_sync_batch_size", "Current sync batch size, by sink.",
            ["sink"], registry=registry)


__all__ = ["PROBE_BUCKETS", "Counter", "Gauge", "Histogram", "Info", "Metrics"]
