"""Telemetry: tracing (OpenTelemetry), metrics (Prometheus) and structured logs."""

from headrace.telemetry.interceptor import TracingInterceptor, traced_methods
from headrace.telemetry.logs import JsonFormatter, TraceContextFilter, configure_logging
from headrace.telemetry.metrics import Metrics, MetricsServer, ModelMetrics
from headrace.telemetry.tracing import ModelTracing, Tracing

__all__ = [
    "JsonFormatter",
    "Metrics",
    "MetricsServer",
    "ModelMetrics",
    "ModelTracing",
    "TraceContextFilter",
    "Tracing",
    "TracingInterceptor",
    "configure_logging",
    "traced_methods",
]
