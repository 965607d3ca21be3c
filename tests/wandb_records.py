"""Read an offline W&B run (``<dir>/wandb/offline-run-*/run-<id>.wandb``) back, for tests.

wandb >= 0.2x writes the file from its Go core and ships no Python reader any more (the old
``wandb.sdk.internal.datastore.DataStore`` is gone), so this is a small reader of the same format: a 7-byte
header (``":W&B"``, magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks, each with a 7-byte
header (CRC-32 of type + data, little-endian length, type FULL/FIRST/MIDDLE/LAST); a block tail shorter than a
header is zero padding. Each assembled record is a ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path}: not a W&B record log"
    records, pos, chunks = [], HEADER, []
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # padding at a block's end
            pos += BLOCK - pos % BLOCK
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        if (crc, length, kind) == (0, 0, 0):  # zero-filled tail
            break
        chunk = data[pos + HEADER:pos + HEADER + length]
        assert len(chunk) == length, f"{path}: truncated record at byte {pos}"
        assert zlib.crc32(chunk, zlib.crc32(bytes([kind]))) == crc, f"{path}: bad checksum at byte {pos}"
        pos += HEADER + length
        chunks.append(chunk)
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(b"".join(chunks))
            records.append(record)
            chunks = []
        else:
            assert kind in (FIRST, MIDDLE), f"{path}: unknown record type {kind} at byte {pos}"
    return records


def _key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


@dataclass
class OfflineRun:
    """What an offline run recorded: its identity and every logged step/summary (values JSON-decoded)."""

    path: Path
    name: str = ""
    group: str = ""
    project: str = ""
    run_id: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def history_keys(self) -> set[str]:
        return {k for step in self.history for k in step}


def read_offline_run(out_dir: str | Path, wait_s: float = 15.0) -> OfflineRun:
    """The single offline run W&B wrote under ``out_dir/wandb``. W&B's service process writes the file; under
    load it may still be flushing it after ``finish()`` returned (seen once in the suite: no run record yet), so
    an incomplete file is read again until ``wait_s``."""
    files = sorted(Path(out_dir).glob("wandb/offline-run-*/run-*.wandb"))
    assert len(files) == 1, f"expected one offline W&B run under {out_dir}/wandb, found {files}"
    deadline = time.monotonic() + wait_s
    while True:
        try:
            run = _parse(files[0])
        except AssertionError:  # a record cut mid-write
            if time.monotonic() > deadline:
                raise
        else:
            if run.run_id or time.monotonic() > deadline:
                return run
        time.sleep(0.5)


def _parse(path: Path) -> OfflineRun:
    run = OfflineRun(path)
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            r = record.run
            run.name, run.group, run.project, run.run_id = r.display_name, r.run_group, r.project, r.run_id
            run.config.update({_key(i): json.loads(i.value_json) for i in r.config.update})
        elif kind == "config":
            run.config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
        elif kind == "history":
            run.history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            run.summary.update({_key(i): json.loads(i.value_json) for i in record.summary.update})
    return run
