"""Exactly-once submits on an API that has no idempotency key.

Walacor has no unique index, so a submit retried after a lost response stores a
second row. Each record therefore carries its operation key in a field of its own
(`WalacorClient.key_field`). When an attempt's outcome is unknown (timeout after
sending, broken connection, 5xx), the key is looked up before any new submit, and a
stored row is adopted instead of submitted again.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from walacord.errors import WalacorError, WalacorValidationError
from walacord.walacor.results import StoredRecord

if TYPE_CHECKING:
    from walacord.walacor.client import WalacorClient

log = logging.getLogger(__name__)

# Submits per call whose outcome may be unknown before the call gives up. Each
# retry is preceded by a key lookup, so this bounds the calls, not the duplicates.
MAX_SUBMIT_ATTEMPTS = 3
# Keys per getcomplex `$in` lookup, to keep one request body small.
LOOKUP_CHUNK = 500


async def find_keys(
    client: WalacorClient, etid: int, keys: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Return the stored row for each key that is present, keyed by its key.

    One key is looked up with `query/get`. Several use `query/getcomplex` with
    `$in`, and fall back to one `query/get` per key when the server rejects that
    pipeline with a 4xx.
    """
    if len(keys) == 1:
        return await _find_each(client, etid, keys)

    found: dict[str, dict[str, Any]] = {}
    for start in range(0, len(keys), LOOKUP_CHUNK):
        chunk = list(keys[start : start + LOOKUP_CHUNK])
        pipeline = [{"$match": {client.key_field: {"$in": chunk}}}]
        try:
            result = await client.query_complex(etid, pipeline)
        except WalacorValidationError as exc:
            log.warning(
                "walacor.lookup.getcomplex_rejected",
                extra={"fields": {"etid": etid, "error": str(exc)}},
            )
            found.update(await _find_each(client, etid, keys[start:]))
            return found
        found.update(_first_row_per_key(client.key_field, result.rows, etid))
    return found


async def _find_each(
    client: WalacorClient, etid: int, keys: Sequence[str]
) -> dict[str, dict[str, Any]]:
    found: dict[str, dict[str, Any]] = {}
    for key in keys:
        result = await client.query(
            etid, {client.key_field: key}, page_no=1, page_size=10, total_req=False
        )
        found.update(_first_row_per_key(client.key_field, result.rows, etid))
    return found


def _first_row_per_key(
    key_field: str, rows: Sequence[dict[str, Any]], etid: int
) -> dict[str, dict[str, Any]]:
    """Keep the earliest row of each key; more than one means an earlier duplicate."""
    by_key: dict[str, dict[str, Any]] = {}
    for row in sorted(rows, key=lambda r: r.get("CreatedAt") or 0):
        key = row.get(key_field)
        if not isinstance(key, str):
            continue
        if key in by_key:
            log.warning(
                "walacor.lookup.duplicate_key",
                extra={"fields": {"etid": etid, "key": key, "uid": row.get("UID")}},
            )
            continue
        by_key[key] = row
    return by_key


def _adopted(key: str, row: Mapping[str, Any], etid: int) -> StoredRecord:
    return StoredRecord(
        key=key, uid=str(row.get("UID")), eid=str(row.get("EId")), etid=etid, es=None, adopted=True
    )


async def submit_once(
    client: WalacorClient,
    etid: int,
    record: Mapping[str, Any],
    key: str,
    *,
    check_first: bool = False,
) -> StoredRecord:
    """Store `record` under `key` exactly once and return where it is stored."""
    results = await submit_many_once(client, etid, [(key, record)], check_first=check_first)
    return results[0]


async def submit_many_once(
    client: WalacorClient,
    etid: int,
    items: Sequence[tuple[str, Mapping[str, Any]]],
    *,
    check_first: bool = False,
) -> list[StoredRecord]:
    """Store (key, record) pairs exactly once, as one envelope, and return them in order.

    Pass `check_first=True` when an earlier call for these keys ended with an error
    whose `maybe_committed` is True: the keys are then looked up before the first
    submit. An error whose `maybe_committed` is False is raised at once. When every
    attempt has an unknown outcome, the last error is raised, and it keeps
    `maybe_committed` True.

    NOTE: a request still running on the server when the lookup runs (a hung
    submit) can commit after the lookup found nothing, so exactly-once holds only
    when the server answers or drops each submit before the lookup.
    """
    keys = [key for key, _ in items]
    if len(set(keys)) != len(keys):
        raise ValueError("submit_many_once: keys must be unique within one call")

    key_field = client.key_field
    pending = {key: {**record, key_field: key} for key, record in items}
    results: dict[str, StoredRecord] = {}
    outcome_unknown = check_first
    last_error: WalacorError | None = None

    for attempt in range(1, MAX_SUBMIT_ATTEMPTS + 2):
        # Step 1: after an unknown outcome, adopt every key that is already stored.
        if outcome_unknown:
            try:
                found = await find_keys(client, etid, list(pending))
            except WalacorError as exc:
                # The submit before this lookup may have been stored, whatever error
                # the lookup itself raised, so the caller must look up again.
                exc.maybe_committed = True
                raise
            for key, row in found.items():
                results[key] = _adopted(key, row, etid)
                del pending[key]
            if found:
                log.info(
                    "walacor.submit.adopted",
                    extra={"fields": {"etid": etid, "keys": len(found), "attempt": attempt}},
                )
            if not pending:
                break

        if attempt > MAX_SUBMIT_ATTEMPTS:
            assert last_error is not None
            raise last_error

        # Step 2: submit what is still absent.
        try:
            receipt = await client.submit(etid, list(pending.values()))
        except WalacorError as exc:
            if not exc.maybe_committed:
                raise
            log.warning(
                "walacor.submit.outcome_unknown",
                extra={
                    "fields": {
                        "etid": etid,
                        "records": len(pending),
                        "attempt": attempt,
                        "reason": exc.reason,
                        "error": str(exc),
                    }
                },
            )
            outcome_unknown = True
            last_error = exc
            continue

        for key, uid in zip(pending, receipt.uids, strict=True):
            results[key] = StoredRecord(
                key=key, uid=uid, eid=receipt.eid, etid=receipt.etid, es=receipt.es, adopted=False
            )
        break

    return [results[key] for key in keys]
