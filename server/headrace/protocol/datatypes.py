"""The protocol's tensor datatypes and their numpy, wire and model-config forms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

import ml_dtypes
import numpy as np

from headrace.protocol import model_config_pb2


@dataclass(frozen=True, slots=True)
class Datatype:
    """One protocol datatype.

    `dtype` is the little-endian numpy dtype of its raw wire form (object for BYTES, whose
    elements are Python bytes). `contents_field` names its typed field in InferTensorContents,
    or is None when it travels as raw contents only (FP16, BF16).
    """

    name: str
    dtype: np.dtype[np.generic]
    contents_field: str | None
    config_type: int

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for BYTES, whose elements vary in size."""
        return 0 if self.name == "BYTES" else self.dtype.itemsize


def _entry(name: str, scalar: Any, contents_field: str | None, config_name: str) -> Datatype:
    dtype: np.dtype[np.generic] = np.dtype(scalar)
    if dtype.itemsize > 1:
        dtype = dtype.newbyteorder("<")
    return Datatype(name, dtype, contents_field, model_config_pb2.DataType.Value(config_name))


DATATYPES: Final[dict[str, Datatype]] = {
    entry.name: entry
    for entry in (
        _entry("BOOL", np.bool_, "bool_contents", "TYPE_BOOL"),
        _entry("UINT8", np.uint8, "uint_contents", "TYPE_UINT8"),
        _entry("UINT16", np.uint16, "uint_contents", "TYPE_UINT16"),
        _entry("UINT32", np.uint32, "uint_contents", "TYPE_UINT32"),
        _entry("UINT64", np.uint64, "uint64_contents", "TYPE_UINT64"),
        _entry("INT8", np.int8, "int_contents", "TYPE_INT8"),
        _entry("INT16", np.int16, "int_contents", "TYPE_INT16"),
        _entry("INT32", np.int32, "int_contents", "TYPE_INT32"),
        _entry("INT64", np.int64, "int64_contents", "TYPE_INT64"),
        _entry("FP16", np.float16, None, "TYPE_FP16"),
        _entry("FP32", np.float32, "fp32_contents", "TYPE_FP32"),
        _entry("FP64", np.float64, "fp64_contents", "TYPE_FP64"),
        _entry("BF16", ml_dtypes.bfloat16, None, "TYPE_BF16"),
        _entry("BYTES", np.object_, "bytes_contents", "TYPE_STRING"),
    )
}

_BY_DTYPE: Final[dict[np.dtype[np.generic], Datatype]] = {}
for _entry_value in DATATYPES.values():
    # Both byte orders: arrays a model builds are native, arrays off the wire little-endian.
    _BY_DTYPE[_entry_value.dtype] = _entry_value
    _BY_DTYPE[_entry_value.dtype.newbyteorder("=")] = _entry_value
    _BY_DTYPE[_entry_value.dtype.newbyteorder(">")] = _entry_value
del _entry_value


def datatype_of(array: np.ndarray) -> Datatype | None:
    """The protocol datatype of a numpy array, or None if it has none.

    Fixed-width bytes and str arrays (`S`, `U`) are BYTES.
    """
    found = _BY_DTYPE.get(array.dtype)
    if found is None and array.dtype.kind in "SU":
        return DATATYPES["BYTES"]
    return found
