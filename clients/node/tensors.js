// Raw tensor contents of the Open Inference Protocol: little-endian, row-major; a BYTES element
// is a 4-byte little-endian length followed by that many bytes. One Buffer per tensor, the
// entry that goes into raw_input_contents (or comes back in raw_output_contents).

// Fixed-size datatypes: element size and the DataView accessors that read and write them.
// 64-bit integers are BigInt, so values beyond 2**53 survive the round trip. FP16 and BF16
// have no JavaScript number type and are left out.
const FIXED = {
  BOOL: { size: 1, get: (view, at) => view.getUint8(at) !== 0, set: (view, at, v) => view.setUint8(at, v ? 1 : 0) },
  UINT8: { size: 1, get: (view, at) => view.getUint8(at), set: (view, at, v) => view.setUint8(at, v) },
  UINT16: { size: 2, get: (view, at) => view.getUint16(at, true), set: (view, at, v) => view.setUint16(at, v, true) },
  UINT32: { size: 4, get: (view, at) => view.getUint32(at, true), set: (view, at, v) => view.setUint32(at, v, true) },
  UINT64: { size: 8, get: (view, at) => view.getBigUint64(at, true), set: (view, at, v) => view.setBigUint64(at, BigInt(v), true) },
  INT8: { size: 1, get: (view, at) => view.getInt8(at), set: (view, at, v) => view.setInt8(at, v) },
  INT16: { size: 2, get: (view, at) => view.getInt16(at, true), set: (view, at, v) => view.setInt16(at, v, true) },
  INT32: { size: 4, get: (view, at) => view.getInt32(at, true), set: (view, at, v) => view.setInt32(at, v, true) },
  INT64: { size: 8, get: (view, at) => view.getBigInt64(at, true), set: (view, at, v) => view.setBigInt64(at, BigInt(v), true) },
  FP32: { size: 4, get: (view, at) => view.getFloat32(at, true), set: (view, at, v) => view.setFloat32(at, v, true) },
  FP64: { size: 8, get: (view, at) => view.getFloat64(at, true), set: (view, at, v) => view.setFloat64(at, v, true) },
};

const LENGTH_PREFIX_BYTES = 4;

/** The number of elements a shape holds. */
export function elementCount(shape) {
  return shape.reduce((count, dimension) => count * Number(dimension), 1);
}

/**
 * Encode `values` (flat, row-major) as raw contents of `datatype`. BYTES values are Buffers,
 * Uint8Arrays or strings (encoded as UTF-8).
 */
export function packRaw(datatype, values) {
  if (datatype === "BYTES") {
    const elements = values.map((value) => Buffer.from(value));
    const packed = Buffer.alloc(elements.reduce((size, element) => size + LENGTH_PREFIX_BYTES + element.length, 0));
    let at = 0;
    for (const element of elements) {
      packed.writeUInt32LE(element.length, at);
      element.copy(packed, at + LENGTH_PREFIX_BYTES);
      at += LENGTH_PREFIX_BYTES + element.length;
    }
    return packed;
  }
  const type = fixedType(datatype);
  const packed = Buffer.alloc(values.length * type.size);
  const view = new DataView(packed.buffer, packed.byteOffset, packed.byteLength);
  values.forEach((value, index) => type.set(view, index * type.size, value));
  return packed;
}

/**
 * Decode raw contents of `datatype` into a flat array: numbers (BigInt for INT64 and UINT64,
 * booleans for BOOL, Buffers for BYTES). Throws when the length does not fit the datatype.
 */
export function unpackRaw(datatype, raw) {
  if (datatype === "BYTES") {
    const elements = [];
    let at = 0;
    while (at < raw.length) {
      if (at + LENGTH_PREFIX_BYTES > raw.length) {
        throw new Error(`BYTES contents: truncated length prefix at byte ${at}`);
      }
      const length = raw.readUInt32LE(at);
      at += LENGTH_PREFIX_BYTES;
      if (at + length > raw.length) {
        throw new Error(`BYTES contents: element of ${length} bytes overruns the contents at byte ${at}`);
      }
      elements.push(Buffer.from(raw.subarray(at, at + length)));
      at += length;
    }
    return elements;
  }
  const type = fixedType(datatype);
  if (raw.length % type.size !== 0) {
    throw new Error(`${datatype} contents: ${raw.length} bytes is not a multiple of ${type.size}`);
  }
  const view = new DataView(raw.buffer, raw.byteOffset, raw.byteLength);
  return Array.from({ length: raw.length / type.size }, (_, index) => type.get(view, index * type.size));
}

function fixedType(datatype) {
  const type = FIXED[datatype];
  if (type === undefined) {
    throw new Error(`datatype ${datatype} has no packing helper here`);
  }
  return type;
}
