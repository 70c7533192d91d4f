"""Capture of every inference call: record, spool, Parquet writer, object stores, reader."""

from headrace.capture.record import CaptureRecord, RecordFormatError

__all__ = ["CaptureRecord", "RecordFormatError"]
