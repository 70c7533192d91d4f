// Round trips of the raw-contents helpers (npm test).
import assert from "node:assert/strict";
import { test } from "node:test";

import { elementCount, packRaw, unpackRaw } from "./tensors.js";

test("FP32 is little-endian float32", () => {
  const packed = packRaw("FP32", [1, -2.5]);
  assert.deepEqual([...packed], [0, 0, 0x80, 0x3f, 0, 0, 0x20, 0xc0]);
  assert.deepEqual(unpackRaw("FP32", packed), [1, -2.5]);
});

test("INT64 keeps values beyond 2**53", () => {
  const values = [-9223372036854775808n, 9007199254740993n, 9223372036854775807n];
  assert.deepEqual(unpackRaw("INT64", packRaw("INT64", values)), values);
});

test("BYTES elements carry a 4-byte little-endian length", () => {
  const packed = packRaw("BYTES", ["ab", Buffer.alloc(0)]);
  assert.deepEqual([...packed], [2, 0, 0, 0, 0x61, 0x62, 0, 0, 0, 0]);
  assert.deepEqual(unpackRaw("BYTES", packed), [Buffer.from("ab"), Buffer.alloc(0)]);
});

test("malformed contents are refused", () => {
  assert.throws(() => unpackRaw("BYTES", Buffer.from([5, 0, 0, 0, 1])), /overruns/);
  assert.throws(() => unpackRaw("FP32", Buffer.alloc(3)), /not a multiple of 4/);
  assert.throws(() => packRaw("FP16", [1]), /no packing helper/);
});

test("elementCount multiplies the dimensions", () => {
  assert.equal(elementCount([2, 3]), 6);
  assert.equal(elementCount([]), 1);
});
