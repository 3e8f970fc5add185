"""Verified PostgreSQL backups: pg_dump on a schedule, checks, drills, retention, restore.

`BackupManager` does the work on request; `BackupScheduler` runs it daily and weekly;
`walacord.backup.control` holds the control-channel methods.
"""

from walacord.backup.alerts import BackupAlert
from walacord.backup.manager import BackupManager
from walacord.backup.manifest import Manifest

__all__ = ["BackupAlert", "BackupManager", "Manifest"]
