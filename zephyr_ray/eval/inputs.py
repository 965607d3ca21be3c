"""Reading the (small) input files of the eval stage on the driver, with each row's provenance.

Rows carry ``_source`` and ``_row`` (and, for JSONL, the raw line as ``_json``) like the training readers'
(:mod:`zephyr_ray.data.readers`), so :func:`zephyr_ray.data.rows.valid_rows` names the file, line/row and
field of a bad one.
"""

from __future__ import annotations

import json
from typing import Any

import fsspec

from zephyr_ray.data.readers import RAW_JSON, ROW, SOURCE, detect_format, read_rows
from zephyr_ray.data.schema import BadRowError


def read_input_rows(path: str, fmt: str = "auto", split: str = "train") -> list[dict[str, Any]]:
    """Every raw row of ``path``, in file order (nothing validated yet).

    JSONL (local or any fsspec URL, ``.gz`` too) is read here line by line; a ``.json`` file holding one JSON
    array (AlpacaEval's ``model_outputs.json``) gives one row per element (``_row`` = 0-based index); Parquet,
    ``datasets`` folders and hub ids go through :func:`zephyr_ray.data.readers.read_rows` (needs Ray).
    """
    kind = detect_format(path) if fmt == "auto" else fmt
    fs, root = fsspec.core.url_to_fs(path)
    if kind == "jsonl" and fs.isfile(root):
        with fsspec.open(path, "r", encoding="utf-8", compression="infer") as f:
            text = f.read()
        if path.lower().endswith((".json", ".json.gz")) and text.lstrip().startswith("["):
            items = json.loads(text)
            for i, item in enumerate(items):
                if not isinstance(item, dict):
                    raise BadRowError(f"{path} row {i}: field <json>: expected an object, got {type(item).__name__}")
            return [{**item, SOURCE: path, ROW: i} for i, item in enumerate(items)]
        return [{SOURCE: path, ROW: n, RAW_JSON: line} for n, line in enumerate(text.splitlines(), 1) if line.strip()]

    rows = read_rows(path, kind, split).take_all()
    return sorted(rows, key=lambda r: (str(r.get(SOURCE)), int(r.get(ROW, 0))))
