"""The load generator against a real Headrace server (in-process, port 0): the open loop sends
exactly its seeded schedule, streams and unary calls are answered and checked, and the
tallies of the client processes add up as they should."""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from bench.frontend import METHOD, check_identity_reply, identity_request
from bench.loadgen import ClientTally, LoadError, LoadSpec, run_load, summarize
from bench.server_process import ServerProcess
from bench.stats import poisson_arrivals
from bench.stream import STREAM_METHOD, check_stream_reply
from tests.conftest import ServerThread, make_settings

MS = 1_000_000


@pytest.fixture(scope="module")
def server() -> Iterator[ServerThread]:
    with ServerThread(make_settings()) as running:
        yield running


def _spec(target: str, **fields: object) -> LoadSpec:
    base: dict[str, object] = {
        "target": target,
        "method": METHOD,
        "request": identity_request(4),
        "check": check_identity_reply,
        "concurrency": 4,
        "clients": 2,
        "warmup_s": 0.2,
        "duration_s": 0.6,
    }
    return LoadSpec(**{**base, **fields})  # type: ignore[arg-type]


def test_open_loop_sends_its_seeded_schedule_and_counts_every_request(
    server: ServerThread,
) -> None:
    spec = _spec(server.address, arrival_rate_per_s=300.0, seed=5, concurrency=16)
    result = run_load(spec, meter=lambda: 0.0)
    window = (spec.warmup_s, spec.warmup_s + spec.duration_s)
    scheduled = sum(
        sum(window[0] <= t < window[1] for t in poisson_arrivals(150.0, window[1], seed))
        for seed in (spec.client_seed(0), spec.client_seed(1))
    )
    assert result.offered_per_s == pytest.approx(scheduled / spec.duration_s)
    assert result.errors == {}
    # Every request scheduled inside the window was answered and has a latency.
    assert result.completed == scheduled
    assert result.p50_ms is not None
    assert result.p999_ms is not None
    assert 0 < result.p50_ms <= result.p99_ms <= result.p999_ms  # type: ignore[operator]


def test_closed_loop_streams_are_answered_and_checked(server: ServerThread) -> None:
    spec = _spec(server.address, method=STREAM_METHOD, check=check_stream_reply, streaming=True)
    result = run_load(spec, meter=lambda: 0.0)
    assert result.completed > 0
    assert result.errors == {}
    assert result.offered_per_s is None
    assert result.requests_per_s == pytest.approx(result.completed / spec.duration_s)


def test_a_wrong_reply_fails_the_run_at_warm_up(server: ServerThread) -> None:
    # The stream check on unary replies: a reply that is not what the check expects.
    spec = _spec(server.address, check=check_stream_reply)
    with pytest.raises(LoadError, match="a client process failed"):
        run_load(spec, meter=lambda: 0.0)


def test_server_cpu_meter_gives_cpu_per_request(tmp_path: Path) -> None:
    log = tmp_path / "bare.log"
    argv = [sys.executable, "-m", "bench.baseline_server", "--host", "127.0.0.1", "--port", "0"]
    with ServerProcess("bare", argv, log) as bare:
        result = run_load(_spec(f"127.0.0.1:{bare.port}", clients=1), meter=bare.cpu_seconds)
    assert result.completed > 0
    assert result.server_cpu_ms_per_request is not None
    assert result.server_cpu_ms_per_request == pytest.approx(
        result.metered * 1000 / result.completed
    )


def test_summarize_adds_up_the_clients() -> None:
    spec = _spec("unused:0", duration_s=2.0)
    first = ClientTally(
        latencies_ns=[1 * MS, 2 * MS],
        errors=Counter(UNAVAILABLE=1),
        error_latencies_ns=[5 * MS],
        cpu_s=0.1,
        completed_in_window=2,
    )
    second = ClientTally(
        latencies_ns=[3 * MS, 4 * MS],
        errors=Counter(UNAVAILABLE=2, WRONG_REPLY=1),
        error_latencies_ns=[7 * MS, 6 * MS],
        cpu_s=0.3,
        completed_in_window=2,
    )
    result = summarize(spec, [first, second], metered=0.8)
    assert result.completed == 4
    assert result.requests_per_s == 2.0
    assert (result.p50_ms, result.p90_ms, result.p99_ms, result.p999_ms) == (2.0, 4.0, 4.0, 4.0)
    assert result.mean_ms == 2.5
    assert result.errors == {"UNAVAILABLE": 3, "WRONG_REPLY": 1}
    assert (result.error_p50_ms, result.error_p99_ms) == (6.0, 7.0)
    assert result.client_cpu_ms_per_request == pytest.approx(100.0)
    assert result.server_cpu_ms_per_request == pytest.approx(200.0)
    assert result.offered_per_s is None


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"clients": 5}, "clients"),
        ({"arrival_rate_per_s": 0.0}, "rate"),
        ({"arrival_rate_per_s": 10.0, "streaming": True}, "closed loop"),
        ({"duration_s": 0.0}, "window"),
    ],
)
def test_load_spec_refuses_what_cannot_run(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _spec("unused:0", **fields)
