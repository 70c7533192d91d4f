"""A real OTLP trace receiver for tests: opentelemetry-proto's TraceService over gRPC on an
ephemeral loopback port, keeping every span it is sent."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def _value(value: AnyValue) -> Any:
    kind = value.WhichOneof("value")
    return getattr(value, kind) if kind else None


@dataclass(frozen=True)
class ReceivedSpan:
    """One exported span, with ids as lowercase hex."""

    name: str
    kind: int
    trace_id: str
    span_id: str
    parent_span_id: str
    attributes: dict[str, Any]
    links: list[tuple[str, str]]
    status_code: int
    status_message: str
    resource: dict[str, Any]

    @classmethod
    def of(cls, span: Span, resource: dict[str, Any]) -> ReceivedSpan:
        return cls(
            name=span.name,
            kind=span.kind,
            trace_id=span.trace_id.hex(),
            span_id=span.span_id.hex(),
            parent_span_id=span.parent_span_id.hex(),
            attributes={kv.key: _value(kv.value) for kv in span.attributes},
            links=[(link.trace_id.hex(), link.span_id.hex()) for link in span.links],
            status_code=span.status.code,
            status_message=span.status.message,
            resource=resource,
        )


class SpanStore:
    """Every span exported to a receiver, safe to read while exports arrive."""

    def __init__(self) -> None:
        self.spans: list[ReceivedSpan] = []
        self.requests: list[tuple[int, int]] = []
        """(spans, bytes) of each gRPC export request, in the order they came."""
        self._lock = threading.Lock()

    def record(self, request: trace_service_pb2.ExportTraceServiceRequest) -> None:
        received = []
        for resource_spans in request.resource_spans:
            resource = {kv.key: _value(kv.value) for kv in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                received += [ReceivedSpan.of(span, resource) for span in scope_spans.spans]
        with self._lock:
            self.spans += received
            self.requests.append((len(received), request.ByteSize()))

    def record_json(self, document: dict[str, Any]) -> None:
        """An OTLP/JSON export: ids are hex strings there, not protobuf JSON's base64."""
        received = []
        for resource_spans in document.get("resourceSpans", []):
            for scope_spans in resource_spans.get("scopeSpans", []):
                for span in scope_spans.get("spans", []):
                    received.append(
                        ReceivedSpan(
                            name=span.get("name", ""),
                            kind=int(span.get("kind", 0)),
                            trace_id=span.get("traceId", "").lower(),
                            span_id=span.get("spanId", "").lower(),
                            parent_span_id=span.get("parentSpanId", "").lower(),
                            attributes={},
                            links=[],
                            status_code=int(span.get("status", {}).get("code", 0)),
                            status_message=span.get("status", {}).get("message", ""),
                            resource={},
                        )
                    )
        with self._lock:
            self.spans += received

    def named(self, name: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.name == name]

    def in_trace(self, trace_id: str) -> list[ReceivedSpan]:
        with self._lock:
            return [span for span in self.spans if span.trace_id == trace_id]


class OtlpReceiver(SpanStore, trace_service_pb2_grpc.TraceServiceServicer):
    """Use as a context manager; `endpoint` is what an OTLP gRPC exporter is given."""

    def __init__(self) -> None:
        super().__init__()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(
        self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext
    ) -> trace_service_pb2.ExportTraceServiceResponse:
        self.record(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def __enter__(self) -> OtlpReceiver:
        self._server.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.stop(0)


def receiving() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as receiver:
        yield receiver


class OtlpHttpReceiver(SpanStore):
    """A receiver over OTLP/HTTP (protobuf POSTs to /v1/traces), as Triton exports;
    `traces_url` is what an exporter is given."""

    def __init__(self) -> None:
        super().__init__()
        store = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                if self.headers.get("Content-Type", "").startswith("application/json"):
                    store.record_json(json.loads(body))  # Triton's C++ exporter sends JSON
                else:
                    store.record(trace_service_pb2.ExportTraceServiceRequest.FromString(body))
                reply = trace_service_pb2.ExportTraceServiceResponse().SerializeToString()
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, format: str, *args: Any) -> None:
                return None

        self._http = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self._http.server_address[1]
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    @property
    def traces_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/traces"

    def __enter__(self) -> OtlpHttpReceiver:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._http.shutdown()
        self._http.server_close()
