// Check liveness, read model metadata and run one inference each on identity (FP32),
// echo_int64 (INT64) and echo_bytes (BYTES), with raw tensor contents, printing one JSON object
// per line:
//
//   {"kind":"live","live":true}
//   {"kind":"metadata","name":"identity","versions":["1"],"platform":"...","inputs":[{"name":"INPUT0","datatype":"FP32","shape":[-1,-1]}],"outputs":[...]}
//   {"kind":"infer","model":"identity","inputs":[{"name":"INPUT0","datatype":"FP32","shape":[2,3],"data":[...]}],"outputs":[...]}
//
// Tensor data is flat, row-major: FP32 as numbers (exactly the float32 values), INT64 as
// integers (exactly, beyond 2**53 too), BYTES as base64 strings (as proto3's JSON mapping
// writes bytes). The C++ client prints the same lines.
//
// node example.js localhost:8800
import { call, connect } from "./client.js";
import { packRaw, unpackRaw } from "./tensors.js";

const REQUESTS = [
  {
    model: "identity",
    datatype: "FP32",
    shape: [2, 3],
    data: [0.1, -1.5, 3.25, 1e-8, -65504.125, 3.4028234663852886e38],
  },
  {
    model: "echo_int64",
    datatype: "INT64",
    shape: [2, 3],
    data: [0n, -1n, 9007199254740993n, -9223372036854775808n, 9223372036854775807n, 42n],
  },
  {
    model: "echo_bytes",
    datatype: "BYTES",
    shape: [2, 2],
    data: [Buffer.from("hello"), Buffer.alloc(0), Buffer.from("grüße, 世界"), Buffer.from([0x00, 0xff, 0x0a])],
  },
];

async function main() {
  const address = process.argv[2];
  if (address === undefined) {
    console.error("usage: node example.js HOST:PORT");
    process.exit(2);
  }
  const client = connect(address);
  try {
    const live = await call(client, "ServerLive", {});
    print({ kind: "live", live: live.live });
    for (const { model } of REQUESTS) {
      const metadata = await call(client, "ModelMetadata", { name: model });
      print({
        kind: "metadata",
        name: metadata.name,
        versions: metadata.versions,
        platform: metadata.platform,
        inputs: metadata.inputs.map(tensorSignature),
        outputs: metadata.outputs.map(tensorSignature),
      });
    }
    for (const request of REQUESTS) {
      print(await infer(client, request));
    }
  } finally {
    client.close();
  }
}

/** One ModelInfer call with INPUT0 in raw contents; the response's tensors decoded. */
async function infer(client, { model, datatype, shape, data }) {
  const raw = packRaw(datatype, data);
  const response = await call(client, "ModelInfer", {
    model_name: model,
    inputs: [{ name: "INPUT0", datatype, shape }],
    raw_input_contents: [raw],
  });
  return {
    kind: "infer",
    model: response.model_name,
    // What was sent, decoded from the wire bytes (FP32: the float32 values, not the literals).
    inputs: [{ name: "INPUT0", datatype, shape, data: unpackRaw(datatype, raw).map(printable) }],
    outputs: response.outputs.map((output, index) => ({
      ...tensorSignature(output),
      data: unpackRaw(output.datatype, response.raw_output_contents[index]).map(printable),
    })),
  };
}

function tensorSignature({ name, datatype, shape }) {
  return { name, datatype, shape };
}

function printable(value) {
  return Buffer.isBuffer(value) ? value.toString("base64") : value;
}

/** One JSON line; BigInt values are written as plain JSON integers, which JSON.stringify refuses. */
function print(value) {
  process.stdout.write(`${toJson(value)}\n`);
}

function toJson(value) {
  if (typeof value === "bigint") {
    return value.toString();
  }
  if (Array.isArray(value)) {
    return `[${value.map(toJson).join(",")}]`;
  }
  if (value !== null && typeof value === "object") {
    return `{${Object.entries(value).map(([key, item]) => `${JSON.stringify(key)}:${toJson(item)}`).join(",")}}`;
  }
  return JSON.stringify(value);
}

main().catch((error) => {
  console.error(`error: ${error.message}`);
  process.exit(1);
});
