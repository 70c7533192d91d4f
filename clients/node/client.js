// The GRPCInferenceService client, built at run time from the protocol's .proto files in
// ../../proto (the files Headrace itself is generated from): nothing generated is committed, so
// the client cannot drift from the protocol.
import path from "node:path";
import { fileURLToPath } from "node:url";

import grpc from "@grpc/grpc-js";
import protoLoader from "@grpc/proto-loader";

export const PROTO_DIR = path.resolve(path.dirname(fileURLToPath(import.meta.url)), "..", "..", "proto");
export const SERVICE_PROTO = path.join(PROTO_DIR, "grpc_service.proto");

/** The package definition of proto/grpc_service.proto (and the model_config.proto it imports). */
export function loadPackageDefinition() {
  return protoLoader.loadSync(SERVICE_PROTO, {
    includeDirs: [PROTO_DIR],
    // Field names as the .proto spells them (raw_input_contents), enums as names, int64 as
    // BigInt-free Numbers (shapes and counters; tensor data travels in raw contents, as Buffers),
    // and unset fields present with their defaults, as in every other protobuf runtime.
    keepCase: true,
    longs: Number,
    enums: String,
    defaults: true,
    oneofs: true,
  });
}

/** A GRPCInferenceService client for `address` (host:port), on an insecure channel. */
export function connect(address) {
  const inference = grpc.loadPackageDefinition(loadPackageDefinition()).inference;
  return new inference.GRPCInferenceService(address, grpc.credentials.createInsecure());
}

/** Call unary `method` (ServerLive, ModelInfer, ...) with a deadline; resolves to the response. */
export function call(client, method, request, timeoutMs = 10_000) {
  return new Promise((resolve, reject) => {
    client[method](request, { deadline: Date.now() + timeoutMs }, (error, response) => {
      if (error) {
        reject(error);
      } else {
        resolve(response);
      }
    });
  });
}
