"""A JSONL file read as byte-range shards (one Ray Data read task each) gives exactly the rows and line numbers
of reading it whole, whatever the shard and chunk sizes. No Ray: the datasource's shards are read directly."""

import gzip
import json
import random

import pyarrow as pa
import pytest

from zephyr_ray.data.readers import JsonlRows, _read_shard, _shard_starts


def _rows_of(ds: JsonlRows) -> list[tuple[str, int, str]]:
    out = []
    for file, start, end, line in ds._shards:
        for table in _read_shard(ds._fs, file, file, start, end, line):
            out += zip(table["_source"].to_pylist(), table["_row"].to_pylist(), table["_json"].to_pylist())
    return out


def _whole(path) -> list[tuple[str, int, str]]:
    with open(path, encoding="utf-8", newline="\n") as f:
        return [(str(path), n, line) for n, line in enumerate(f, 1) if line.strip()]


@pytest.mark.parametrize("seed", range(40))
def test_shard_starts_are_line_starts_with_their_line_numbers(seed):
    rng = random.Random(seed)
    data = "".join("x" * rng.randint(0, 30) + "\n" for _ in range(rng.randint(0, 80))).encode()
    if data and rng.random() < 0.3:
        data = data[:-1]  # no newline at the end
    shard, chunk = rng.randint(1, 60), rng.randint(1, 17)
    starts = _shard_starts(pa.BufferReader(data), len(data), shard, chunk)
    assert starts[0] == (0, 1) and [o for o, _ in starts] == sorted({o for o, _ in starts})
    for offset, line in starts[1:]:
        assert data[offset - 1:offset] == b"\n" and offset < len(data)  # a line starts here
        assert data[:offset].count(b"\n") + 1 == line
    # no shard is shorter than asked for, except the last
    assert all(b - a >= shard for (a, _), (b, _) in zip(starts, starts[1:]))


def test_a_file_in_many_shards_reads_every_row_once_with_its_line_number(tmp_path):
    path = tmp_path / "d.jsonl"
    rows = [json.dumps({"i": i, "text": "é" * (i % 37)}) for i in range(3000)]
    path.write_text("\n".join(r if i % 11 else "" for i, r in enumerate(rows)) + "\n", encoding="utf-8")
    ds = JsonlRows(str(path), shard_bytes=4096)
    assert len(ds._shards) > 10
    assert _rows_of(ds) == _whole(path)
    assert ds.estimate_inmemory_data_size() == path.stat().st_size


def test_gz_files_are_one_shard_and_folders_read_in_name_order(tmp_path):
    (tmp_path / "b.jsonl").write_text('{"i": 2}\n{"i": 3}\n')
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write('{"i": 0}\n\n{"i": 1}\n')
    (tmp_path / "notes.txt").write_text("not data\n")
    ds = JsonlRows(str(tmp_path), shard_bytes=1)
    assert [(s[0].rsplit("/", 1)[1], s[1], s[3]) for s in ds._shards] == [
        ("a.jsonl.gz", 0, 1), ("b.jsonl", 0, 1), ("b.jsonl", 9, 2)]
    assert [(src.rsplit("/", 1)[1], n, json.loads(line)["i"]) for src, n, line in _rows_of(ds)] == [
        ("a.jsonl.gz", 1, 0), ("a.jsonl.gz", 3, 1), ("b.jsonl", 1, 2), ("b.jsonl", 2, 3)]


def test_missing_paths_and_folders_without_jsonl_are_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        JsonlRows(str(tmp_path / "nope.jsonl"))
    (tmp_path / "x.txt").write_text("x\n")
    with pytest.raises(FileNotFoundError, match="no .jsonl"):
        JsonlRows(str(tmp_path))


def test_a_stage_stream_is_bounded_by_data_stream_buffer_mb():
    from types import SimpleNamespace

    from ray.data import DataContext

    from zephyr_ray.config import DataConfig
    from zephyr_ray.data.pipeline import bounded

    def stream(mb: int):  # bounded() sets the dataset's own DataContext copy (a Dataset here would start Ray)
        return bounded(SimpleNamespace(context=DataContext()), DataConfig(stream_buffer_mb=mb)).context

    ctx = stream(24)
    opts = ctx.execution_options
    assert opts.preserve_order and opts.resource_limits.object_store_memory == 24 * 2**20
    assert ctx.target_max_block_size == 6 * 2**20  # a quarter of the budget
    assert stream(1).target_max_block_size == 2**20


def test_a_stream_buffer_below_one_mb_is_refused_at_load():
    from zephyr_ray.config import DataConfig

    assert ("stream_buffer_mb", "must be at least 1 MB") in DataConfig(stream_buffer_mb=0).problems()
    assert not DataConfig().problems()
