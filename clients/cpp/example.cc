// Check liveness, read model metadata and run one inference each on identity (FP32),
// echo_int64 (INT64) and echo_bytes (BYTES), with raw tensor contents, printing one JSON object
// per line, the same lines as the Node client (clients/node/example.js):
//
//   {"kind":"live","live":true}
//   {"kind":"metadata","name":"identity","versions":["1"],"platform":"...","inputs":[...],"outputs":[...]}
//   {"kind":"infer","model":"identity","inputs":[{"name":"INPUT0","datatype":"FP32","shape":[2,3],"data":[...]}],"outputs":[...]}
//
// Tensor data is flat, row-major: FP32 as the shortest decimal that reads back as the same
// value (exactly the float32 values), INT64 as integers, BYTES as base64 (as proto3's JSON
// mapping writes bytes).
//
// build/headrace_example localhost:8800
#include <grpcpp/grpcpp.h>

#include <charconv>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <iostream>
#include <limits>
#include <memory>
#include <sstream>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "grpc_service.grpc.pb.h"
#include "tensors.h"

namespace {

constexpr auto kTimeout = std::chrono::seconds(10);

// A failed RPC: the method and gRPC's status, for the message on stderr.
class CallError : public std::runtime_error {
 public:
  CallError(const std::string& method, const grpc::Status& status)
      : std::runtime_error(method + ": status " + std::to_string(status.error_code()) + ": " +
                           status.error_message()) {}
};

std::string JsonString(std::string_view text) {
  std::string out = "\"";
  for (const char c : text) {
    switch (c) {
      case '"': out += "\\\""; break;
      case '\\': out += "\\\\"; break;
      case '\n': out += "\\n"; break;
      case '\r': out += "\\r"; break;
      case '\t': out += "\\t"; break;
      default:
        if (static_cast<unsigned char>(c) < 0x20) {
          char escaped[8];
          std::snprintf(escaped, sizeof(escaped), "\\u%04x", static_cast<unsigned char>(c));
          out += escaped;
        } else {
          out += c;
        }
    }
  }
  return out + "\"";
}

std::string Base64(std::string_view bytes) {
  static constexpr char kAlphabet[] =
      "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
  std::string out;
  std::size_t i = 0;
  for (; i + 3 <= bytes.size(); i += 3) {
    const std::uint32_t group = static_cast<unsigned char>(bytes[i]) << 16 |
                                static_cast<unsigned char>(bytes[i + 1]) << 8 |
                                static_cast<unsigned char>(bytes[i + 2]);
    for (int shift = 18; shift >= 0; shift -= 6) out += kAlphabet[(group >> shift) & 0x3f];
  }
  const std::size_t rest = bytes.size() - i;
  if (rest > 0) {
    std::uint32_t group = static_cast<unsigned char>(bytes[i]) << 16;
    if (rest == 2) group |= static_cast<unsigned char>(bytes[i + 1]) << 8;
    out += kAlphabet[(group >> 18) & 0x3f];
    out += kAlphabet[(group >> 12) & 0x3f];
    out += rest == 2 ? kAlphabet[(group >> 6) & 0x3f] : '=';
    out += '=';
  }
  return out;
}

// The float32 value widened to double, in the shortest form that reads back as that double.
std::string JsonNumber(float value) {
  char text[32];
  const auto result = std::to_chars(text, text + sizeof(text), static_cast<double>(value));
  return std::string(text, result.ptr);
}

std::string JsonNumber(std::int64_t value) { return std::to_string(value); }

template <typename Items, typename Format>
std::string JsonArray(const Items& items, Format format) {
  std::string out = "[";
  bool first = true;
  for (const auto& item : items) {
    if (!first) out += ",";
    first = false;
    out += format(item);
  }
  return out + "]";
}

std::string Shape(const google::protobuf::RepeatedField<std::int64_t>& shape) {
  return JsonArray(shape, [](std::int64_t dimension) { return std::to_string(dimension); });
}

std::string Signature(const std::string& name, const std::string& datatype,
                      const std::string& shape) {
  return "\"name\":" + JsonString(name) + ",\"datatype\":" + JsonString(datatype) +
         ",\"shape\":" + shape;
}

// A tensor's flat data as a JSON array, decoded from raw contents by datatype.
std::string RawData(const std::string& datatype, std::string_view raw) {
  if (datatype == "FP32") {
    return JsonArray(headrace::UnpackRaw<float>(raw), [](float v) { return JsonNumber(v); });
  }
  if (datatype == "INT64") {
    return JsonArray(headrace::UnpackRaw<std::int64_t>(raw),
                     [](std::int64_t v) { return JsonNumber(v); });
  }
  if (datatype == "BYTES") {
    return JsonArray(headrace::UnpackBytes(raw),
                     [](const std::string& v) { return JsonString(Base64(v)); });
  }
  throw std::invalid_argument("no printer for datatype " + datatype);
}

void Deadline(grpc::ClientContext& context) {
  context.set_deadline(std::chrono::system_clock::now() + kTimeout);
}

class Example {
 public:
  explicit Example(const std::string& address)
      : stub_(inference::GRPCInferenceService::NewStub(
            grpc::CreateChannel(address, grpc::InsecureChannelCredentials()))) {}

  void Live() {
    grpc::ClientContext context;
    Deadline(context);
    inference::ServerLiveResponse response;
    Check("ServerLive", stub_->ServerLive(&context, inference::ServerLiveRequest(), &response));
    std::cout << "{\"kind\":\"live\",\"live\":" << (response.live() ? "true" : "false") << "}\n";
  }

  void Metadata(const std::string& model) {
    grpc::ClientContext context;
    Deadline(context);
    inference::ModelMetadataRequest request;
    request.set_name(model);
    inference::ModelMetadataResponse response;
    Check("ModelMetadata", stub_->ModelMetadata(&context, request, &response));
    const auto tensors = [](const auto& list) {
      return JsonArray(list, [](const auto& tensor) {
        return "{" + Signature(tensor.name(), tensor.datatype(), Shape(tensor.shape())) + "}";
      });
    };
    std::cout << "{\"kind\":\"metadata\",\"name\":" << JsonString(response.name())
              << ",\"versions\":" << JsonArray(response.versions(), JsonString)
              << ",\"platform\":" << JsonString(response.platform())
              << ",\"inputs\":" << tensors(response.inputs())
              << ",\"outputs\":" << tensors(response.outputs()) << "}\n";
  }

  // One ModelInfer call with INPUT0 in raw contents; prints what was sent and what came back.
  void Infer(const std::string& model, const std::string& datatype,
             const std::vector<std::int64_t>& shape, const std::string& raw) {
    grpc::ClientContext context;
    Deadline(context);
    inference::ModelInferRequest request;
    request.set_model_name(model);
    auto* input = request.add_inputs();
    input->set_name("INPUT0");
    input->set_datatype(datatype);
    for (const auto dimension : shape) input->add_shape(dimension);
    request.add_raw_input_contents(raw);
    inference::ModelInferResponse response;
    Check("ModelInfer", stub_->ModelInfer(&context, request, &response));
    std::string outputs = "[";
    for (int i = 0; i < response.outputs_size(); ++i) {
      const auto& output = response.outputs(i);
      if (i > 0) outputs += ",";
      outputs += "{" + Signature(output.name(), output.datatype(), Shape(output.shape())) +
                 ",\"data\":" + RawData(output.datatype(), response.raw_output_contents(i)) +
                 "}";
    }
    outputs += "]";
    std::cout << "{\"kind\":\"infer\",\"model\":" << JsonString(response.model_name())
              << ",\"inputs\":[{" << Signature("INPUT0", datatype, Shape(input->shape()))
              << ",\"data\":" << RawData(datatype, raw) << "}],\"outputs\":" << outputs
              << "}\n";
  }

 private:
  static void Check(const std::string& method, const grpc::Status& status) {
    if (!status.ok()) throw CallError(method, status);
  }

  std::unique_ptr<inference::GRPCInferenceService::Stub> stub_;
};

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::cerr << "usage: " << argv[0] << " HOST:PORT\n";
    return 2;
  }
  try {
    Example example(argv[1]);
    example.Live();
    for (const char* model : {"identity", "echo_int64", "echo_bytes"}) example.Metadata(model);
    example.Infer("identity", "FP32", {2, 3},
                  headrace::PackRaw<float>({0.1F, -1.5F, 3.25F, 1e-8F, -65504.125F,
                                            std::numeric_limits<float>::max()}));
    example.Infer("echo_int64", "INT64", {2, 3},
                  headrace::PackRaw<std::int64_t>({0, -1, 9007199254740993,
                                                   std::numeric_limits<std::int64_t>::min(),
                                                   std::numeric_limits<std::int64_t>::max(),
                                                   42}));
    example.Infer("echo_bytes", "BYTES", {2, 2},
                  headrace::PackBytes({"hello", "", "grüße, 世界", std::string("\x00\xff\n", 3)}));
  } catch (const std::exception& error) {
    std::cerr << "error: " << error.what() << "\n";
    return 1;
  }
  return 0;
}
