"""Fixtures for client tests: an emulator on a free loopback port and a client for it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from walacord.emulator import Emulator, running_emulator
from walacord.walacor import WalacorClient

ETID = 10001
FIELDS = [
    {"FieldName": "walacord_key", "DataType": "TEXT", "Required": False, "MaxLength": 128},
    {"FieldName": "amount", "DataType": "INTEGER", "Required": False},
]


@pytest.fixture
def etid() -> int:
    """Envelope type that the `emulator` fixture creates, with a walacord_key field."""
    return ETID


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    async with running_emulator(seed=7) as emulator:
        await emulator.store.create_schema(
            1, {"ETId": ETID, "TableName": "payments", "Fields": FIELDS}
        )
        yield emulator


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[WalacorClient]:
    async with WalacorClient(
        emulator.url,
        username="admin",
        password="admin",
        connect_timeout=1.0,
        read_timeout=2.0,
        request_timeout=4.0,
    ) as client:
        yield client
