"""Walacor API client: deadlines on every call, classified errors, exactly-once submits."""

from walacord.walacor.client import WalacorClient, api_root
from walacord.walacor.results import QueryResult, StoredRecord, SubmitReceipt

__all__ = ["QueryResult", "StoredRecord", "SubmitReceipt", "WalacorClient", "api_root"]
