"""`headrace captures ls | show | export`: captures read back for people and other tools.

- `ls`: one line per capture file (size, rows are not read: listing touches no file).
- `show`: each call's metadata, then each tensor as datatype, shape and a summary.
- `export --format parquet`: one Parquet file of the selected calls (columns unified across
  files; tensors as in the capture files). `csv` / `jsonl`: one line per call with the
  metadata and each tensor as a nested JSON list (BYTES elements as text when they are UTF-8,
  else `{"base64": ...}`; NaN and infinities as strings); for people and spreadsheets, while
  Parquet is the exact form.
"""

from __future__ import annotations

import argparse
import base64
import csv
import json
import math
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, TextIO

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from headrace.capture.parquet import CaptureRow, rows_from_table
from headrace.capture.reader import list_files, open_source, read_records, read_tables
from headrace.capture.store import ObjectStore, make_store
from headrace.config import load_settings
from headrace.errors import ConfigError, ObjectStoreError
from headrace.protocol.datatypes import datatype_of

EXIT_FAILURE = 1
_VALUES_SHOWN = 8
_CSV_METADATA = (
    "request_id",
    "model",
    "version",
    "received",
    "responded",
    "latency_ns",
    "status_code",
    "status",
    "status_message",
    "trace_id",
    "span_id",
    "batch_id",
    "batch_size",
    "endpoint",
    "identity",
    "truncated",
)


def run_captures_command(arguments: argparse.Namespace, out: TextIO | None = None) -> int:
    """Run `headrace captures ACTION`; returns the exit status (errors go to stderr)."""
    out = out or sys.stdout
    options = {"endpoint": arguments.endpoint, "region": arguments.region}
    options["scheme"] = arguments.scheme
    try:
        store = _store(arguments, options)
        selection = (arguments.model, arguments.model_version, arguments.since, arguments.until)
        if arguments.action == "ls":
            files = list_files(store, *selection)
            for stored in files:
                out.write(f"{stored.size_bytes:>12}  {stored.path}\n")
            total = sum(stored.size_bytes for stored in files)
            out.write(f"{len(files)} files, {total} bytes\n")
        elif arguments.action == "show":
            _show(read_records(store, *selection), arguments.limit, arguments.request_id, out)
        elif arguments.action == "export":
            count = _export(store, selection, arguments.format, arguments.output)
            out.write(f"{count} calls written to {arguments.output}\n")
        store.close()
    except (ObjectStoreError, ConfigError) as exc:
        print(f"headrace captures: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


def _store(arguments: argparse.Namespace, options: dict[str, str]) -> ObjectStore:
    if arguments.store is not None:
        return open_source(arguments.store, **options)
    settings = load_settings(arguments.config, environ=os.environ)
    capture = getattr(settings, "capture", None)
    store_settings = getattr(capture, "store", None)
    if store_settings is None:
        raise ConfigError(
            f"no --store, and {arguments.config or 'the embedded default config'} has no "
            "capture.store"
        )
    return make_store(store_settings)


def _summary(array: np.ndarray) -> str:
    datatype = datatype_of(array)
    name = datatype.name if datatype is not None else str(array.dtype)
    head = f"{name} {list(array.shape)}"
    if array.size == 0:
        return head
    flat = array.reshape(-1)
    shown = ", ".join(_text(value) for value in flat[:_VALUES_SHOWN])
    more = ", ..." if flat.size > _VALUES_SHOWN else ""
    if array.dtype.kind in "iuf" or name == "BF16":
        numbers = flat.astype(np.float64)
        return (
            f"{head} min {np.nanmin(numbers):g} max {np.nanmax(numbers):g} "
            f"mean {np.nanmean(numbers):g} [{shown}{more}]"
        )
    return f"{head} [{shown}{more}]"


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return repr(value)
    if isinstance(value, np.generic) and value.dtype.kind == "b":
        return str(bool(value))
    return f"{float(value):g}" if not isinstance(value, str | bool) else str(value)


def _show(rows: Iterator[CaptureRow], limit: int, request_id: str | None, out: TextIO) -> None:
    shown = 0
    for row in rows:
        if request_id is not None and row.request_id != request_id:
            continue
        if shown == limit:
            break
        shown += 1
        out.write(
            f"{row.received.isoformat()}  {row.model} v{row.version}  id {row.request_id}  "
            f"{row.status}  {row.latency_ns / 1e6:.3f} ms\n"
        )
        details = {
            "trace": row.trace_id,
            "span": row.span_id,
            "batch": f"{row.batch_id} ({row.batch_size})" if row.batch_id else "",
            "endpoint": row.endpoint,
            "identity": row.identity,
            "message": row.status_message,
            "headers": json.dumps(row.headers) if row.headers else "",
            "parameters": json.dumps(row.parameters) if row.parameters else "",
            "decode error": row.decode_error,
            "truncated": "yes" if row.truncated else "",
        }
        for key, value in details.items():
            if value:
                out.write(f"  {key}: {value}\n")
        for side, tensors in (("input", row.inputs), ("output", row.outputs)):
            for name, array in tensors.items():
                out.write(f"  {side} {name}: {_summary(array)}\n")
    out.write(f"{shown} calls shown\n")


def _json_value(value: Any) -> Any:
    if isinstance(value, list):
        return [_json_value(item) for item in value]
    if isinstance(value, bytes):
        try:
            return value.decode()
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _tensor_json(array: np.ndarray) -> Any:
    if array.dtype.kind not in "biuO":
        array = array.astype(np.float64)
    return _json_value(array.tolist())


def _row_dict(row: CaptureRow) -> dict[str, Any]:
    record: dict[str, Any] = {
        "request_id": row.request_id,
        "model": row.model,
        "version": row.version,
        "received": row.received.isoformat(),
        "responded": row.responded.isoformat(),
        "latency_ns": row.latency_ns,
        "status_code": row.status_code,
        "status": row.status,
        "status_message": row.status_message,
        "trace_id": row.trace_id,
        "span_id": row.span_id,
        "batch_id": row.batch_id,
        "batch_size": row.batch_size,
        "endpoint": row.endpoint,
        "identity": row.identity,
        "truncated": row.truncated,
        "headers": row.headers,
        "parameters": row.parameters,
    }
    for side, tensors in (("input", row.inputs), ("output", row.outputs)):
        for name, array in tensors.items():
            record[f"{side}.{name}"] = _tensor_json(array)
    return record


def _export(store: Any, selection: tuple[Any, ...], output_format: str, output: Path) -> int:
    if output_format == "parquet":
        # Files may hold different tensors: a first pass unifies their schemas.
        schemas = [table.schema for _, table in read_tables(store, *selection)]
        if not schemas:
            pq.write_table(pa.table({}), output)
            return 0
        schema = pa.unify_schemas(schemas, promote_options="permissive")
        count = 0
        with pq.ParquetWriter(output, schema, compression="zstd") as writer:
            for _, table in read_tables(store, *selection):
                for column in schema:
                    if column.name not in table.schema.names:
                        table = table.append_column(column, pa.nulls(len(table), column.type))
                writer.write_table(table.select(schema.names).cast(schema))
                count += len(table)
        return count
    dicts = (
        _row_dict(row)
        for _, table in read_tables(store, *selection)
        for row in rows_from_table(table)
    )
    count = 0
    with output.open("w", newline="") as file:
        if output_format == "jsonl":
            for record in dicts:
                file.write(json.dumps(record) + "\n")
                count += 1
            return count
        rows = list(dicts)
        columns = [*_CSV_METADATA, "headers", "parameters"]
        for record in rows:
            columns += [key for key in record if key not in columns]
        writer = csv.DictWriter(file, fieldnames=columns)
        writer.writeheader()
        for record in rows:
            writer.writerow(
                {
                    key: json.dumps(value) if isinstance(value, dict | list) else value
                    for key, value in record.items()
                }
            )
    return len(rows)
