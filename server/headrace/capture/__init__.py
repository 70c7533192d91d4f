"""Capture of every inference call: record, spool, Parquet writer, object stores, reader."""

from headrace.capture.parquet import CaptureRow, records_to_table, rows_from_table
from headrace.capture.record import CaptureRecord, RecordFormatError
from headrace.capture.store import LocalStore, ObjectStore, S3Store, make_store
from headrace.capture.writer import CaptureFileWriter, WrittenFile

__all__ = [
    "CaptureFileWriter",
    "CaptureRecord",
    "CaptureRow",
    "LocalStore",
    "ObjectStore",
    "RecordFormatError",
    "S3Store",
    "WrittenFile",
    "make_store",
    "records_to_table",
    "rows_from_table",
]
