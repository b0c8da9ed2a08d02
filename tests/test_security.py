"""Security defaults: broker and Redis credentials validated at start-up and read from
the environment or files, secrets never shown, model files refused when tampered with or
when they hold code, loopback binds by default, size limits on events and requests."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import redis
import torch
from factories import make_bundle

from common.data.wire import InvalidEventError, decode_event, encode_event
from common.infra.kafka_clients import _common
from common.infra.redis_client import connect
from common.infra.settings import Settings, SettingsError, load_settings
from common.model.registry import CorruptVersionError, Registry
from serving.app import BadRequestError, parse_recall

SECRET = "S3cr3t-hunter2-do-not-print"
SASL = {"RECSTREAM_KAFKA_SECURITY_PROTOCOL": "SASL_SSL",
        "RECSTREAM_KAFKA_SASL_MECHANISM": "SCRAM-SHA-512",
        "RECSTREAM_KAFKA_SASL_USERNAME": "trainer",
        "RECSTREAM_KAFKA_SASL_PASSWORD": SECRET}


def _error(env: dict[str, str]) -> str:
    with pytest.raises(SettingsError) as exc:
        load_settings(env)
    return str(exc.value)


def _secret_file(tmp_path: Path, text: str = SECRET + "\n") -> str:
    path = tmp_path / "secret"
    path.write_text(text)
    path.chmod(0o600)
    return str(path)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- Kafka SASL / SSL ----------------------------------------------------------------


def test_sasl_settings_are_passed_to_the_kafka_clients() -> None:
    cfg = _common(load_settings(SASL).kafka, "b1:9093,b2:9093")
    assert cfg["security_protocol"] == "SASL_SSL" and cfg["sasl_mechanism"] == "SCRAM-SHA-512"
    assert cfg["sasl_plain_username"] == "trainer" and cfg["sasl_plain_password"] == SECRET


def test_a_sasl_protocol_needs_a_mechanism() -> None:
    env = {**SASL, "RECSTREAM_KAFKA_SASL_MECHANISM": ""}
    assert _error(env).startswith("RECSTREAM_KAFKA_SASL_MECHANISM")


def test_only_plain_and_scram_mechanisms_are_accepted() -> None:
    message = _error({**SASL, "RECSTREAM_KAFKA_SASL_MECHANISM": "GSSAPI"})
    assert "must be one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512" in message


@pytest.mark.parametrize("missing", ["RECSTREAM_KAFKA_SASL_USERNAME",
                                     "RECSTREAM_KAFKA_SASL_PASSWORD"])
def test_a_sasl_protocol_needs_a_user_and_a_password(missing: str) -> None:
    env = {k: v for k, v in SASL.items() if k != missing}
    assert _error(env).startswith(f"{missing}: Value error, required with security_protocol")


def test_sasl_credentials_without_a_sasl_protocol_are_refused() -> None:
    env = {**SASL, "RECSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL"}
    assert "only used with security_protocol SASL_PLAINTEXT or SASL_SSL" in _error(env)


def test_the_sasl_password_is_read_from_a_file(tmp_path: Path) -> None:
    env = {**SASL, "RECSTREAM_KAFKA_SASL_PASSWORD": "",
           "RECSTREAM_KAFKA_SASL_PASSWORD_FILE": _secret_file(tmp_path)}
    assert load_settings(env).kafka.sasl_password.get_secret_value() == SECRET


def test_a_password_and_a_different_password_file_are_refused(tmp_path: Path) -> None:
    env = {**SASL, "RECSTREAM_KAFKA_SASL_PASSWORD_FILE": _secret_file(tmp_path, "other")}
    message = _error(env)
    assert "not both" in message and SECRET not in message


@pytest.mark.parametrize("content", [None, ""])
def test_a_missing_or_empty_password_file_is_refused(tmp_path: Path,
                                                     content: str | None) -> None:
    path = tmp_path / "pw"
    if content is not None:
        path.write_text(content)
    message = _error({**SASL, "RECSTREAM_KAFKA_SASL_PASSWORD": "",
                      "RECSTREAM_KAFKA_SASL_PASSWORD_FILE": str(path)})
    assert message.startswith("RECSTREAM_KAFKA_SASL_PASSWORD_FILE=")


def test_ssl_files_are_passed_to_the_kafka_clients(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    env = {"RECSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL", "RECSTREAM_KAFKA_SSL_CAFILE": str(ca)}
    assert _common(load_settings(env).kafka, "b:9093")["ssl_cafile"] == str(ca)


def test_a_missing_ssl_file_is_refused(tmp_path: Path) -> None:
    env = {"RECSTREAM_KAFKA_SECURITY_PROTOCOL": "SSL",
           "RECSTREAM_KAFKA_SSL_CERTFILE": str(tmp_path / "client.pem")}
    assert _error(env).startswith("RECSTREAM_KAFKA_SSL_CERTFILE=") and "no such file" in \
        _error(env)


def test_ssl_files_without_ssl_are_refused() -> None:
    env = {"RECSTREAM_KAFKA_SSL_CAFILE": "/etc/hostname"}
    assert "only used with security_protocol SSL or SASL_SSL" in _error(env)


# -- Redis ACL / TLS -----------------------------------------------------------------


def test_the_redis_password_is_read_from_a_file(tmp_path: Path) -> None:
    env = {"RECSTREAM_REDIS_USERNAME": "publisher",
           "RECSTREAM_REDIS_PASSWORD_FILE": _secret_file(tmp_path)}
    assert load_settings(env).redis.password.get_secret_value() == SECRET


def test_an_acl_user_needs_a_password() -> None:
    assert _error({"RECSTREAM_REDIS_USERNAME": "publisher"}).startswith(
        "RECSTREAM_REDIS_PASSWORD: Value error, required with RECSTREAM_REDIS_USERNAME")


def test_a_password_in_the_redis_url_is_accepted_and_not_shown() -> None:
    settings = load_settings({"RECSTREAM_REDIS_URL": f"redis://:{SECRET}@r:6379/0"})
    assert SECRET not in repr(settings) and SECRET not in str(settings)


def test_a_password_in_the_url_and_in_the_settings_is_refused() -> None:
    message = _error({"RECSTREAM_REDIS_URL": f"redis://:{SECRET}@r:6379/0",
                      "RECSTREAM_REDIS_PASSWORD": "another"})
    assert "the URL holds a password too" in message and SECRET not in message


@pytest.mark.parametrize("url", [f"http://:{SECRET}@r:6379/0", f"redis://:{SECRET}@r:port/0"])
def test_a_bad_redis_url_is_refused_without_showing_it(url: str) -> None:
    message = _error({"RECSTREAM_REDIS_URL": url})
    assert message.startswith("RECSTREAM_REDIS_URL:") and SECRET not in message


def test_the_tls_ca_file_must_exist(tmp_path: Path) -> None:
    message = _error({"RECSTREAM_REDIS_URL": "rediss://r:6380/0", "RECSTREAM_REDIS_TLS": "true",
                      "RECSTREAM_REDIS_TLS_CA_FILE": str(tmp_path / "ca.pem")})
    assert message.startswith("RECSTREAM_REDIS_TLS_CA_FILE=") and "no such file" in message


def test_a_tls_ca_file_without_tls_is_refused() -> None:
    message = _error({"RECSTREAM_REDIS_URL": "redis://r:6379/0",
                      "RECSTREAM_REDIS_TLS_CA_FILE": "/etc/hostname"})
    assert "only used with TLS" in message


def test_a_tls_client_to_an_unreachable_redis_fails_with_a_connection_error() -> None:
    settings = load_settings({"RECSTREAM_REDIS_URL": f"rediss://127.0.0.1:{_closed_port()}/0",
                              "RECSTREAM_REDIS_TLS": "true",
                              "RECSTREAM_REDIS_SOCKET_TIMEOUT_S": "1"})
    with pytest.raises(redis.ConnectionError):
        connect(settings).ping()


# -- secrets never printed or logged -------------------------------------------------


def _recstream(tmp_path: Path, *argv: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("RECSTREAM_")}
    clean.update(RECSTREAM_HOME=str(tmp_path / "home"), RECSTREAM_LOG_LEVEL="DEBUG", **env)
    return subprocess.run([sys.executable, "-m", "recstream", *argv], capture_output=True,
                          text=True, env=clean, timeout=120)


@pytest.mark.parametrize("where", ["file", "url"])
def test_a_failing_command_never_prints_or_logs_the_redis_password(tmp_path: Path,
                                                                   where: str) -> None:
    url = f"127.0.0.1:{_closed_port()}/0"
    env = ({"RECSTREAM_REDIS_URL": f"redis://{url}", "RECSTREAM_REDIS_USERNAME": "publisher",
            "RECSTREAM_REDIS_PASSWORD_FILE": _secret_file(tmp_path)} if where == "file"
           else {"RECSTREAM_REDIS_URL": f"redis://publisher:{SECRET}@{url}"})
    result = _recstream(tmp_path, "publisher", "status", RECSTREAM_LOG_FORMAT="json",
                        RECSTREAM_REDIS_SOCKET_TIMEOUT_S="1", **env)
    assert result.returncode == 1 and "Connection refused" in result.stderr
    assert SECRET not in result.stdout + result.stderr


def test_a_settings_error_never_prints_the_kafka_password(tmp_path: Path) -> None:
    env = {**SASL, "RECSTREAM_KAFKA_SASL_USERNAME": "", "RECSTREAM_TRAIN_BATCH_SIZE": "huge"}
    result = _recstream(tmp_path, "eval", "--dataset", "synthetic", **env)
    assert result.returncode == 1
    assert "RECSTREAM_KAFKA_SASL_USERNAME" in result.stderr
    assert SECRET not in result.stdout + result.stderr


# -- model files ---------------------------------------------------------------------


def _registered(tmp_path: Path) -> tuple[Registry, str]:
    reg = Registry(tmp_path / "models")
    return reg, reg.register(make_bundle(), kind="bootstrap", cutoff_ms=1, parent=None,
                             metrics={}, config_hash="x")


def test_a_flipped_byte_in_the_weights_refuses_the_version(tmp_path: Path) -> None:
    reg, v = _registered(tmp_path)
    weights = reg.root / v / "weights.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CorruptVersionError, match=f"model version {v}: weights.pt does not "
                       "match its checksum"):
        reg.load(v)


class _RunsCode:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_weights_that_would_run_code_are_refused_without_running_it(tmp_path: Path) -> None:
    """Even with a matching checksum (whoever swapped the file rewrote meta.json too)."""
    reg, v = _registered(tmp_path)
    marker = tmp_path / "code-ran"
    weights = reg.root / v / "weights.pt"
    torch.save({"user.ids.weight": _RunsCode(marker)}, weights)
    meta = json.loads((reg.root / v / "meta.json").read_text())
    meta["files"]["weights.pt"] = hashlib.sha256(weights.read_bytes()).hexdigest()
    (reg.root / v / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CorruptVersionError, match="holds objects, not only tensors"):
        reg.load(v)
    assert not marker.exists()


# -- binds and limits ----------------------------------------------------------------


def test_every_listening_address_defaults_to_loopback() -> None:
    settings = Settings()
    groups = {g: getattr(settings, g) for g in Settings.model_fields
              if hasattr(type(getattr(settings, g)), "model_fields")}
    hosts = {f"{g}.{name}": getattr(obj, name) for g, obj in groups.items()
             for name in type(obj).model_fields if name.endswith("host")}
    assert set(hosts) == {"serving.host", "stream.metrics_host", "nightly.metrics_host"}
    assert set(hosts.values()) == {"127.0.0.1"}


def test_an_event_over_the_configured_message_size_is_rejected() -> None:
    limit = load_settings({"RECSTREAM_KAFKA_MAX_MESSAGE_BYTES": "200"}).kafka.max_message_bytes
    raw = encode_event({"event_id": "e1", "user_id": "u" * 200, "item_id": "i1",
                        "event_type": "click", "ts_ms": 1_700_000_000_000})
    with pytest.raises(InvalidEventError, match="exceeds the 200-byte limit"):
        decode_event(raw, limit)


def test_k_above_the_configured_maximum_is_a_bad_request() -> None:
    serving = load_settings({"RECSTREAM_SERVING_MAX_K": "100"}).serving
    with pytest.raises(BadRequestError, match="between 1 and 100"):
        parse_recall("user_id=u1&k=101", serving.default_k, serving.max_k)
