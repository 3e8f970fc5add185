"""Probes of PostgreSQL, Walacor, the application's API and the host.

`base` holds the result type, the per-probe hysteresis and the runner that schedules
one probe; each other module holds one probe.
"""
