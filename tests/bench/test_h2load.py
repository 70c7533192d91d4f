"""h2load as the load generator, against a real Headrace of two workers in a subprocess (metrics
on, port 0): a run is parsed into the window's calls and checked against the server's own
counters; a wrong reply and gRPC errors fail the run. h2load comes from `make bench-tools`
(`make test` runs it)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench import h2load, server_metrics
from bench.frontend import METHOD, check_identity_reply, identity_request
from bench.gpu_sim import METRICS_ENVIRONMENT
from bench.h2load import LoggedCall, ToolMissingError
from bench.loadgen import LoadError, LoadSpec
from bench.server_process import CAPTURE_OFF, WORKERS_VARIABLE, ServerProcess
from bench.stream import check_stream_reply

WORKERS = 2


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    log = tmp_path_factory.mktemp("h2load") / "headrace.log"
    argv = [sys.executable, "-m", "headrace", "serve", "--host", "127.0.0.1", "--port", "0"]
    environment = {WORKERS_VARIABLE: str(WORKERS), **CAPTURE_OFF, **METRICS_ENVIRONMENT}
    with ServerProcess("headrace", argv, log, environment) as running:
        yield running


def _spec(server: ServerProcess, **fields: object) -> LoadSpec:
    base: dict[str, object] = {
        "target": f"127.0.0.1:{server.port}",
        "method": METHOD,
        "request": identity_request(4),
        "check": check_identity_reply,
        "concurrency": 8,
        "clients": 1,
        "connections": 4,
        "warmup_s": 0.3,
        "duration_s": 1.0,
    }
    return LoadSpec(**{**base, **fields})  # type: ignore[arg-type]


def _counts(server: ServerProcess) -> server_metrics.RequestCounts:
    return server_metrics.request_counts(server_metrics.read(server.metrics_url()))


def test_a_run_counts_the_calls_answered_in_its_window(server: ServerProcess) -> None:
    spec = _spec(server)
    before = _counts(server)
    result = h2load.run_h2load(spec, server.cpu_seconds, server.metrics_url())
    answered = _counts(server).since(before)
    assert result.errors == {}
    assert result.completed > 0
    assert result.requests_per_s == pytest.approx(result.completed / spec.duration_s)
    assert 0 < result.p50_ms <= result.p99_ms <= result.p999_ms  # type: ignore[operator]
    assert result.client_cpu_s > 0
    assert result.metered > 0  # the server's CPU over the window
    # The window's calls are some of those the server answered over the run, all OK.
    assert list(answered.by_code) == ["OK"]
    assert result.completed < answered.total
    assert set(answered.by_worker) <= {str(worker) for worker in range(WORKERS)}
    assert sum(answered.by_worker.values()) == answered.total
    assert result.batching is not None
    assert result.batching.batches > 0


def test_a_wrong_reply_fails_the_run_before_it_starts(server: ServerProcess) -> None:
    before = _counts(server)
    with pytest.raises(LoadError, match="wrong reply"):
        h2load.run_h2load(
            _spec(server, check=check_stream_reply), server.cpu_seconds, server.metrics_url()
        )
    assert _counts(server).since(before).total == 1  # nghttp's call only


def test_grpc_errors_under_http_200_fail_the_run(server: ServerProcess) -> None:
    # A request the server refuses (INVALID_ARGUMENT in the trailers, HTTP 200): nghttp's
    # reply has no message.
    spec = _spec(server, request=b"\x0a\x03nope")
    with pytest.raises(LoadError, match="no gRPC reply"):
        h2load.run_h2load(spec, server.cpu_seconds, server.metrics_url())


def test_the_server_counts_must_cover_every_answered_call() -> None:
    ok = server_metrics.RequestCounts({"OK": 100}, {"0": 60, "1": 40})
    h2load.check_server_counts(ok, answered=96, started=100)
    with pytest.raises(LoadError, match="did not all reach Headrace"):
        h2load.check_server_counts(ok, answered=101, started=104)
    with pytest.raises(LoadError, match="did not all reach Headrace"):
        h2load.check_server_counts(ok, answered=90, started=99)
    failed = server_metrics.RequestCounts({"OK": 90, "INVALID_ARGUMENT": 10}, {"0": 100})
    with pytest.raises(LoadError, match="INVALID_ARGUMENT"):
        h2load.check_server_counts(failed, answered=100, started=100)


def test_the_window_keeps_calls_that_end_inside_it() -> None:
    calls = h2load.parse_log("1000\t200\t50\n1100\t200\t100\n1150\t-1\t10\n1200\t503\t20\n")
    assert calls[0] == LoggedCall(1000, 200, 50)
    tally = h2load.window_tally(calls, start_us=1100, end_us=1230)
    assert tally.latencies_ns == [100_000]  # ends at 1200; the first ends at 1050
    assert tally.errors == {"STREAM_FAILED": 1, "HTTP_503": 1}


def test_the_concurrency_is_spread_evenly_over_every_connection(server: ServerProcess) -> None:
    layout = h2load.layout(_spec(server, concurrency=64, clients=2, connections=8))
    assert (layout.threads, layout.connections, layout.streams_per_connection) == (2, 16, 4)
    with pytest.raises(ValueError, match="multiple of --clients x --connections"):
        h2load.layout(_spec(server, concurrency=12, clients=1, connections=8))
    with pytest.raises(ValueError, match="closed-loop unary"):
        h2load.layout(_spec(server, arrival_rate_per_s=100.0))


def test_the_frame_is_grpcs_length_prefix() -> None:
    assert h2load.grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_a_missing_h2load_says_how_to_install_it(
    server: ServerProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ToolMissingError, match="make bench-tools"):
        h2load.run_h2load(_spec(server), server.cpu_seconds, server.metrics_url())
