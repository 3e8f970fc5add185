"""Every Prometheus metric walacord exports, declared in one place.

`Metrics(registry)` registers them on the registry it is given, so each test and each
daemon instance gets its own. Names follow Prometheus conventions: the `walacord_`
prefix, base units, `_total` on counters and labels with a bounded set of values.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from walacord import __version__

PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
# A group commit took 0.3 to 0.6 ms on the 2-core test machine's virtual disk (outbox
# benchmark); seconds mean a failing or saturated disk.
COMMIT_BUCKETS = (0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                  1.0, 2.5, 5.0)


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
        self.log_write_errors = Counter(
            "walacord_log_write_errors_total",
            "Log lines a log file could not take (disk full, permissions), by file; the "
            "lines still go to stderr.", ["file"], registry=registry)
        self.config_reloads = Counter(
            "walacord_config_reloads_total", "Configuration reloads by result.",
            ["result"], registry=registry)
        self.watchdog_stalls = Counter(
            "walacord_watchdog_stalls_total",
            "Times a component missed its progress deadline and held back the watchdog.",
            ["component"], registry=registry)

        # --- probes, modes and repair ---------------------------------------------
        self.mode = Gauge(
            "walacord_mode", "1 for the current operating mode, 0 for the others.",
            ["mode"], registry=registry)
        self.mode_transitions = Counter(
            "walacord_mode_transitions_total", "Mode changes by old and new mode.",
            ["from", "to"], registry=registry)
        self.probe_success = Gauge(
            "walacord_probe_success", "1 when the probe's last run succeeded, else 0.",
            ["probe"], registry=registry)
        self.probe_up = Gauge(
            "walacord_probe_up", "1 when the probe is up after hysteresis, else 0.",
            ["probe"], registry=registry)
        self.probe_duration = Histogram(
            "walacord_probe_duration_seconds", "Duration of each probe run.",
            ["probe"], buckets=PROBE_BUCKETS, registry=registry)
        self.probe_failures = Counter(
            "walacord_probe_failures_total", "Failed probe runs by reason class.",
            ["probe", "reason"], registry=registry)
        self.probe_skipped = Counter(
            "walacord_probe_skipped_runs_total",
            "Runs not started because the previous run was still in flight.",
            ["probe"], registry=registry)
        self.probe_abandoned = Counter(
            "walacord_probe_abandoned_calls_total",
            "Probe runs given up at their deadline and left to unwind on their own.",
            ["probe"], registry=registry)
        self.db_pool_connections = Gauge(
            "walacord_db_pool_connections", "Connections of walacord's pool by state.",
            ["state"], registry=registry)
        self.db_pool_requests_waiting = Gauge(
            "walacord_db_pool_requests_waiting", "Requests waiting for a pool connection.",
            registry=registry)
        self.db_pool_recycles = Counter(
            "walacord_db_pool_recycles_total", "Pool recycles by trigger.",
            ["reason"], registry=registry)
        self.db_pool_recycles_refused = Counter(
            "walacord_db_pool_recycles_refused_total",
            "Recycles not done because the hourly budget was spent.",
            ["reason"], registry=registry)
        self.app_restarts = Counter(
            "walacord_app_restarts_total", "Application restart commands run, by result.",
            ["result"], registry=registry)
        self.host_disk_free_ratio = Gauge(
            "walacord_host_disk_free_ratio", "Free fraction of a watched directory's disk.",
            ["dir"], registry=registry)
        self.host_memory_used_ratio = Gauge(
            "walacord_host_memory_used_ratio", "Used fraction of the host's memory.",
            registry=registry)
        self.walacor_tls_expiry_seconds = Gauge(
            "walacord_walacor_tls_cert_expiry_remaining_seconds",
            "Seconds until the Walacor server's TLS certificate expires.", registry=registry)
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
        self.outbox_blocked = Gauge(
            "walacord_outbox_blocked_operations",
            "Pending operations held back by a dead operation with the same ordering key.",
            registry=registry)
        self.outbox_enqueued = Counter(
            "walacord_outbox_enqueued_total",
            "Operations accepted into the outbox (duplicates of a known key not counted).",
            registry=registry)
        self.outbox_rejected = Counter(
            "walacord_outbox_rejected_total", "Enqueues rejected, by reason.",
            ["reason"], registry=registry)
        self.outbox_commit_duration = Histogram(
            "walacord_outbox_commit_duration_seconds",
            "Duration of each durable group commit of enqueued operations, fsync "
            "included; a slow disk shows here first.",
            buckets=COMMIT_BUCKETS, registry=registry)
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
        self.outbox_store_errors = Counter(
            "walacord_outbox_sync_store_errors_total",
            "Sync passes ended early because the outbox store could not be written.",
            registry=registry)
        self.outbox_batch_size = Gauge(
            "walacord_outbox_sync_batch_size", "Current sync batch size, by sink.",
            ["sink"], registry=registry)

        # --- backups --------------------------------------------------------------
        self.backup_last_success = Gauge(
            "walacord_backup_last_success_timestamp_seconds",
            "Unix time the last backup finished and passed its list and checksum checks.",
            registry=registry)
        self.backup_last_verified = Gauge(
            "walacord_backup_last_verified_timestamp_seconds",
            "Unix time a backup last passed verification (list and checksum, or a drill).",
            registry=registry)
        self.backup_duration = Gauge(
            "walacord_backup_duration_seconds",
            "Wall time of the last successful backup, pg_dump through verification.",
            registry=registry)
        self.backup_size = Gauge(
            "walacord_backup_size_bytes", "Size of the last successful backup file.",
            registry=registry)
        self.backup_failures = Counter(
            "walacord_backup_failures_total",
            "Failed backup operations by operation: dump, verify, drill, restore.",
            ["operation"], registry=registry)
        for operation in ("dump", "verify", "drill", "restore", "retention"):
            # Exported as 0 from the start, so a first failure shows as an increase.
            self.backup_failures.labels(operation=operation)
        self.backup_last_drill = Gauge(
            "walacord_backup_last_drill_timestamp_seconds",
            "Unix time the last restore drill passed.", registry=registry)
        self.backup_skipped = Counter(
            "walacord_backup_skipped_total",
            "Backups skipped because another instance held the database's backup lock.",
            registry=registry)
        self.backup_deleted = Counter(
            "walacord_backup_deleted_total", "Backups deleted by the retention policy.",
            registry=registry)
        self.backup_count = Gauge(
            "walacord_backups", "Backups in the backup directory.", registry=registry)
        self.backup_damaged = Gauge(
            "walacord_backups_damaged",
            "Damaged backups in the backup directory: the latest checksum, readability or "
            "drill check failed, the dump is missing or not a regular file, or the manifest "
            "is unreadable.",
            registry=registry)

        # --- alerts -------------------------------------------------------------
        self.alerts = Gauge(
            "walacord_alerts",
            "Alerts tracked by walacord's alert engine, by state (pending, firing, "
            "suppressed, silenced).", ["state"], registry=registry)
        self.alert_notifications = Counter(
            "walacord_alert_notifications_total",
            "Alert notifications raised, by kind (firing, resolved, repeated).",
            ["kind"], registry=registry)
        self.alert_notifications_rate_limited = Counter(
            "walacord_alert_notifications_rate_limited_total",
            "Firing notifications held back by the global rate cap.", registry=registry)
        self.alert_deliveries = Counter(
            "walacord_alert_deliveries_total",
            "Delivery attempts of alert notifications, by sink and result.",
            ["sink", "result"], registry=registry)
        self.alert_delivery_queue = Gauge(
            "walacord_alert_delivery_queue_length",
            "Alert notifications waiting in alerts.db for delivery.", registry=registry)
        self.alert_deliveries_dropped = Counter(
            "walacord_alert_deliveries_dropped_total",
            "Queued alert notifications discarded undelivered, by reason.",
            ["reason"], registry=registry)
        self.alert_source_errors = Counter(
            "walacord_alert_source_errors_total",
            "Alert condition sources that raised instead of returning conditions.",
            registry=registry)
        # --- control channel ------------------------------------------------------
        self.control_connections = Gauge(
            "walacord_control_connections", "Open control-socket connections.",
            registry=registry)
        self.control_connections_rejected = Counter(
            "walacord_control_connections_rejected_total",
            "Control connections closed at once, by reason (busy, permission), or closed "
            "to admit a new one (evicted).",
            ["reason"], registry=registry)
        self.control_requests = Counter(
            "walacord_control_requests_total",
            "Control requests by method and outcome (ok, error). Requests that name no "
            "registered method count under method=\"(invalid)\".",
            ["method", "outcome"], registry=registry)
        self.control_request_duration = Histogram(
            "walacord_control_request_duration_seconds",
            "Time to serve one control request, by method.",
            ["method"], buckets=PROBE_BUCKETS, registry=registry)
        self.control_protocol_errors = Counter(
            "walacord_control_protocol_errors_total",
            "Control lines answered with a protocol error, by error name.",
            ["error"], registry=registry)


__all__ = ["PROBE_BUCKETS", "Counter", "Gauge", "Histogram", "Info", "Metrics"]
