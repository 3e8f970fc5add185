"""Alerting: rules raise alerts once per problem and deliver them durably.

- `engine` tracks pending, firing and resolved alerts from conditions.
- `rules` contains the built-in rules and the dependency table.
- `store` is the alerts.db delivery queue and the silences.
- `sinks` writes alerts.log and sends to Alertmanager and hooks.
- `service` is the daemon component, and `control` has the control-channel handlers.
"""
