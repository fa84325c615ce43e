"""A small reader for W&B's offline ``.wandb`` files (wandb 0.31 dropped its own datastore).

The file is a LevelDB-style log: a 7-byte header (``:W&B``, magic, version), then 32 KiB
blocks of records framed as crc32 (4 bytes), length (2, little-endian), type (1: full,
2: first, 3: middle, 4: last); each payload is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7


def read_records(path: Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path} is not a W&B log"
    records, chunks, pos = [], b"", HEADER
    while pos + 7 <= len(data):
        room = BLOCK - pos % BLOCK
        if room < 7:  # a block's tail too short for a header is padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            pos += room
            continue
        payload = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        chunks = payload if kind in (1, 2) else chunks + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def config_items(records: list[Any]) -> dict[str, Any]:
    """Every config key logged, with its value decoded from JSON."""
    items: dict[str, Any] = {}
    for record in records:
        if record.WhichOneof("record_type") == "config":
            for item in record.config.update:
                key = item.key or "/".join(item.nested_key)
                items[key] = json.loads(item.value_json)
    return items


def history_keys(records: list[Any]) -> set[str]:
    keys: set[str] = set()
    for record in records:
        if record.WhichOneof("record_type") == "history":
            keys.update(item.key or "/".join(item.nested_key) for item in record.history.item)
    return keys
