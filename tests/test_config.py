"""Loading settings: YAML, validation errors naming file and field, environment overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from headrace.config import DEFAULT_PORT, load_settings
from headrace.errors import ConfigError

MODEL = """
models:
  - name: forecast
    entrypoint: {entrypoint}
    max_batch_size: 4
    inputs: [{{name: X, datatype: FP32, dims: [3]}}]
    outputs: [{{name: Y, datatype: FP32, dims: [1]}}]
"""


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "headrace.yaml"
    path.write_text(text)
    return path


def test_embedded_default() -> None:
    settings = load_settings(None)
    assert settings.server.port == DEFAULT_PORT
    assert DEFAULT_PORT not in (8000, 8001, 8002)
    assert [model.name for model in settings.models] == ["identity", "sales_forecast"]
    assert settings.models[0].max_batch_size == 1024


def test_environment_overrides_file(tmp_path: Path) -> None:
    path = _write(tmp_path, "server:\n  port: 9000\n" + MODEL.format(entrypoint="m:M"))
    settings = load_settings(
        path,
        environ={
            "HEADRACE_SERVER__PORT": "9001",
            "HEADRACE_MODELS__0__MAX_BATCH_SIZE": "16",
            "HEADRACE_CONFIG": "ignored: names the file, not a setting",
            "UNRELATED": "x",
        },
    )
    assert settings.server.port == 9001
    assert settings.models[0].max_batch_size == 16


def test_overrides_beat_environment() -> None:
    settings = load_settings(
        None, environ={"HEADRACE_SERVER__PORT": "9001"}, overrides={"server.port": 0}
    )
    assert settings.server.port == 0


def test_bad_environment_value_names_the_variable() -> None:
    with pytest.raises(ConfigError, match=r"HEADRACE_SERVER__PORT: server\.port: Input should be"):
        load_settings(None, environ={"HEADRACE_SERVER__PORT": "many"})


def test_unknown_environment_setting_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"HEADRACE_SERVER__PROT: server\.prot: Extra inputs"):
        load_settings(None, environ={"HEADRACE_SERVER__PROT": "1"})


def test_environment_list_index_out_of_range() -> None:
    with pytest.raises(ConfigError, match="HEADRACE_MODELS__5__NAME: no list item 5"):
        load_settings(None, environ={"HEADRACE_MODELS__5__NAME": "x"})


def test_errors_name_file_and_field(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
server: {port: -1, shutdown_grace_s: 3}
models:
  - name: "bad name"
    entrypoint: nocolon
    inputs: [{name: X, datatype: FP32, dims: [-2]}]
    outputs: []
""",
    )
    with pytest.raises(ConfigError) as raised:
        load_settings(path)
    message = str(raised.value)
    for expected in (
        f"{path}: server.port: Input should be greater than or equal to 0",
        f"{path}: server.shutdown_grace_s: Extra inputs are not permitted",
        f"{path}: models[0].name: String should match pattern",
        f"{path}: models[0].entrypoint: String should match pattern",
        f"{path}: models[0].inputs[0].dims: Value error, dimensions are >= 0",
        f"{path}: models[0].outputs: Tuple should have at least 1 item",
    ):
        assert expected in message


def test_duplicate_model_version(tmp_path: Path) -> None:
    model = MODEL.format(entrypoint="m:M")
    path = _write(tmp_path, model + model.split("models:\n", 1)[1])
    with pytest.raises(ConfigError, match="model 'forecast' version 1 is declared twice"):
        load_settings(path)


def test_duplicate_tensor_names(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        MODEL.format(entrypoint="m:M").replace(
            "inputs: [{name: X, datatype: FP32, dims: [3]}]",
            "inputs: [{name: X, datatype: FP32, dims: [3]}, {name: X, datatype: FP32, dims: [1]}]",
        ),
    )
    with pytest.raises(ConfigError, match=r"models\[0\]: Value error, inputs declare \['X'\]"):
        load_settings(path)


def test_not_yaml(tmp_path: Path) -> None:
    path = _write(tmp_path, "server: [unclosed\n")
    with pytest.raises(ConfigError, match=f"{path}: not valid YAML"):
        load_settings(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"missing\.yaml: cannot read"):
        load_settings(tmp_path / "missing.yaml")


def test_file_entrypoint_is_relative_to_the_config(tmp_path: Path) -> None:
    path = _write(tmp_path, MODEL.format(entrypoint="models/forecast.py:Forecast"))
    settings = load_settings(path)
    assert settings.models[0].entrypoint == f"{tmp_path}/models/forecast.py:Forecast"


def test_shadow_and_drift_settings(tmp_path: Path) -> None:
    text = MODEL.format(entrypoint="m:M") + (
        "    shadow: {endpoint: 'triton:8001', version: '2', sample_rate: 0.1}\n"
        "    drift: {profile_path: profiles/forecast.json, window_rows: 500}\n"
    )
    model = load_settings(_write(tmp_path, text)).models[0]
    assert model.shadow is not None
    assert (model.shadow.endpoint, model.shadow.version, model.shadow.sample_rate) == (
        "triton:8001",
        "2",
        0.1,
    )
    assert model.drift is not None
    assert model.drift.profile_path == tmp_path / "profiles" / "forecast.json"
    assert model.drift.window_rows == 500


def test_bad_shadow_settings_name_the_field(tmp_path: Path) -> None:
    text = MODEL.format(entrypoint="m:M") + "    shadow: {endpoint: nohost, sample_rate: 2}\n"
    with pytest.raises(ConfigError) as error:
        load_settings(_write(tmp_path, text))
    assert "models[0].shadow.endpoint" in str(error.value)
    assert "models[0].shadow.sample_rate" in str(error.value)


def test_settings_are_frozen() -> None:
    settings = load_settings(None)
    with pytest.raises(ValueError, match="frozen"):
        settings.server.port = 1  # type: ignore[misc]


def test_telemetry_defaults_are_off_and_clear_of_other_ports() -> None:
    settings = load_settings(None)
    assert settings.tracing.exporter == "none"
    assert settings.tracing.trace_health is False
    assert settings.metrics.enabled is False
    assert settings.metrics.port not in (DEFAULT_PORT, 8000, 8001, 8002)
    assert settings.logging.format == "text"


def test_telemetry_from_the_environment() -> None:
    settings = load_settings(
        None,
        environ={
            "HEADRACE_TRACING__EXPORTER": "otlp_http",
            "HEADRACE_TRACING__SAMPLE_RATIO": "0.25",
            "HEADRACE_METRICS__ENABLED": "true",
            "HEADRACE_METRICS__PORT": "0",
            "HEADRACE_LOGGING__FORMAT": "json",
        },
    )
    assert settings.tracing.exporter == "otlp_http"
    assert settings.tracing.sample_ratio == 0.25
    assert (settings.metrics.enabled, settings.metrics.port) == (True, 0)
    assert settings.logging.format == "json"


def test_bad_telemetry_values_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"HEADRACE_TRACING__EXPORTER: tracing.exporter"):
        load_settings(None, environ={"HEADRACE_TRACING__EXPORTER": "jaeger"})
    with pytest.raises(ConfigError, match=r"tracing.sample_ratio"):
        load_settings(None, environ={"HEADRACE_TRACING__SAMPLE_RATIO": "1.5"})
    refused = r"tracing: .*max_export_batch_spans \(4096\) must be at most max_queued_spans \(100\)"
    with pytest.raises(ConfigError, match=refused):
        load_settings(None, environ={"HEADRACE_TRACING__MAX_QUEUED_SPANS": "100"})


def test_embedded_default_captures_to_a_local_folder() -> None:
    capture = load_settings(None).capture
    assert capture.enabled
    assert capture.store.kind == "local"
    assert capture.spool_dir == Path("headrace-captures/spool")


def test_capture_is_off_without_a_capture_section(tmp_path: Path) -> None:
    path = _write(tmp_path, MODEL.format(entrypoint="m:M"))
    assert not load_settings(path).capture.enabled


def test_worker_id_and_hash_salt_variables_are_not_settings(tmp_path: Path) -> None:
    path = _write(tmp_path, MODEL.format(entrypoint="m:M"))
    environ = {"HEADRACE_WORKER_ID": "3", "HEADRACE_CAPTURE_HASH_SALT": "s"}
    assert load_settings(path, environ=environ).models[0].name == "forecast"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("drop", "[IMAGE]", "'IMAGE' is not inputs.NAME or outputs.NAME"),
        ("hash", "[outputs.Y]", "'outputs.Y' is not headers.NAME, parameters.NAME or inputs.NAME"),
        ("on_spool_full", "block", "'drop' or 'refuse'"),
        ("sample_rate", "1.5", "less than or equal to 1"),
        ("headers", "[x-tenant, Authorization]", "'authorization' carries credentials"),
    ],
)
def test_model_capture_settings_are_checked(
    tmp_path: Path, field: str, value: str, message: str
) -> None:
    text = MODEL.format(entrypoint="m:M") + f"    capture: {{{field}: {value}}}\n"
    with pytest.raises(ConfigError) as error:
        load_settings(_write(tmp_path, text))
    assert f"models[0].capture.{field}" in str(error.value)
    assert message in str(error.value)


def test_tls_and_token_files_are_relative_to_the_config(tmp_path: Path) -> None:
    path = _write(
        tmp_path,
        """
server:
  tls: {cert_file: certs/server.crt, key_file: certs/server.key}
  auth: {enabled: true, tokens_file: tokens.yaml}
triton:
  tls: {ca_file: certs/triton-ca.crt, cert_file: /abs/client.crt, key_file: client.key}
models:
  - name: remote
    backend: triton
    endpoints: ["triton:8001"]
    tls: {ca_file: other-ca.crt, server_name: triton.internal}
""",
    )
    settings = load_settings(path)
    assert settings.server.tls is not None
    assert settings.server.tls.cert_file == tmp_path / "certs/server.crt"
    assert settings.server.auth.tokens_file == tmp_path / "tokens.yaml"
    assert settings.triton.tls is not None
    assert settings.triton.tls.ca_file == tmp_path / "certs/triton-ca.crt"
    assert settings.triton.tls.cert_file == Path("/abs/client.crt")
    assert settings.triton.tls.key_file == tmp_path / "client.key"
    model_tls = settings.models[0].tls  # type: ignore[union-attr]
    assert model_tls.ca_file == tmp_path / "other-ca.crt"
    assert model_tls.server_name == "triton.internal"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("server: {auth: {enabled: true}}", "auth is enabled but no tokens or tokens_file"),
        (
            "server: {auth: {tokens: [{name: a, sha256: not-a-hash}]}}",
            r"server\.auth\.tokens\[0\]\.sha256",
        ),
        (
            "triton: {tls: {cert_file: client.crt}}",
            "cert_file and key_file go together",
        ),
        ("server: {limits: {max_tensor_rank: 40}}", r"server\.limits\.max_tensor_rank"),
    ],
)
def test_bad_security_settings_name_the_field(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_settings(_write(tmp_path, text))


def test_limits_and_auth_defaults() -> None:
    server = load_settings(None).server
    assert not server.auth.enabled
    assert server.auth.open_health
    assert not server.auth.open_reflection
    assert server.limits.max_inflight_requests == 4096
    assert server.limits.max_request_batch_size is None
