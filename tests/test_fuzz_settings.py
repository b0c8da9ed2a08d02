"""Fuzzing the settings loader: any environment (and any config file) gives either a
``Settings`` or a ``SettingsError`` whose message names the variable (or the file and
key) at fault, and never shows a secret.

Case counts come from the Hypothesis profile (tests/conftest.py).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from common.infra.settings import Settings, SettingsError, env_var_names, load_settings

KNOWN = env_var_names()
GROUPS = sorted({n.removeprefix("RECSTREAM_").split("_")[0].lower() for n in KNOWN})
SECRET = "S3cr3t-"  # every generated secret starts with this, so a leak is unmistakable

# Environment strings cannot hold NUL bytes (os.environ refuses them).
env_text = st.text(st.characters(blacklist_characters="\x00"), max_size=40)
names = st.one_of(
    st.sampled_from(KNOWN),
    st.sampled_from(KNOWN).map(lambda n: n + "_FILE"),
    st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", max_size=30).map("RECSTREAM_".__add__),
    st.text("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ_", min_size=1, max_size=20),
)
values = st.one_of(
    env_text,
    st.integers(-2**70, 2**70).map(str),
    st.floats().map(str),
    st.sampled_from(["", " ", "true", "false", "1", "0", "yes", "on", "none", "null", "inf",
                     "nan", "-1", "1e400", "1,2,3", ",,", "a,b", "/", "/etc/hostname",
                     "/nonexistent/file", "/dev/null", "PLAINTEXT", "SSL", "SASL_SSL",
                     "SASL_PLAINTEXT", "PLAIN", "SCRAM-SHA-512", "GSSAPI", "redis://h:6379/0",
                     "rediss://:pw@h:1/0", "redis://h:port", "unix:///tmp/r.sock",
                     "http://h", "redis://[::1", "DEBUG", "json", "files", "0 2 * * *",
                     "x" * 5000]),
)


def _names_the_variable(message: str, env: dict[str, str]) -> bool:
    config = env.get("RECSTREAM_CONFIG")
    return message.startswith("RECSTREAM_") or bool(config and message.startswith(config))


def _load(env: dict[str, str]) -> Settings | str:
    """The settings, or the error message; any other exception fails the test."""
    try:
        return load_settings(env)
    except SettingsError as exc:
        message = str(exc)
        assert _names_the_variable(message, env), message
        return message


@given(st.dictionaries(names, values, max_size=6))
def test_any_environment_loads_or_fails_naming_the_variable(env: dict[str, str]) -> None:
    _load(env)


@given(st.dictionaries(st.sampled_from(KNOWN), values, min_size=1, max_size=4))
def test_any_values_of_known_variables_load_or_fail_naming_the_variable(
        env: dict[str, str]) -> None:
    _load(env)


@given(st.text("ABCDEFGHIJKLMNOPQRSTUVWXYZ_0123456789", min_size=1, max_size=30)
       .map("RECSTREAM_".__add__).filter(lambda n: n not in KNOWN), values)
def test_an_unknown_variable_is_refused_by_name(name: str, value: str) -> None:
    assert str(_load({name: value})).startswith(f"{name}: unknown setting")


security = st.fixed_dictionaries({}, optional={
    "RECSTREAM_KAFKA_SECURITY_PROTOCOL": st.sampled_from(
        ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL", "sasl_ssl", ""]),
    "RECSTREAM_KAFKA_SASL_MECHANISM": st.sampled_from(
        ["", "PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "GSSAPI", "plain"]),
    "RECSTREAM_KAFKA_SASL_USERNAME": st.sampled_from(["", "svc"]),
    "RECSTREAM_KAFKA_SASL_PASSWORD": env_text.map(SECRET.__add__),
    "RECSTREAM_KAFKA_SASL_PASSWORD_FILE": st.sampled_from(["", "/nonexistent", "/", "/dev/null"]),
    "RECSTREAM_KAFKA_SSL_CAFILE": st.sampled_from(["", "/etc/hostname", "/nonexistent"]),
    "RECSTREAM_REDIS_URL": st.one_of(
        st.sampled_from(["", "redis://h:6379/0", "rediss://h:6380/0", "http://h", "redis://h:x"]),
        env_text.map(lambda s: f"redis://:{SECRET}{s}@h:6379/0"),
        env_text.map(lambda s: f"ftp://u:{SECRET}{s}@h:x/0")),
    "RECSTREAM_REDIS_USERNAME": st.sampled_from(["", "svc"]),
    "RECSTREAM_REDIS_PASSWORD": env_text.map(SECRET.__add__),
    "RECSTREAM_REDIS_PASSWORD_FILE": st.sampled_from(["", "/nonexistent", "/"]),
    "RECSTREAM_REDIS_TLS": st.sampled_from(["true", "false", "maybe"]),
    "RECSTREAM_REDIS_TLS_CA_FILE": st.sampled_from(["", "/etc/hostname", "/nonexistent"]),
})


@given(security)
def test_security_settings_load_or_fail_naming_the_variable_without_the_secret(
        env: dict[str, str]) -> None:
    result = _load(env)
    if isinstance(result, str):
        assert SECRET not in result
    else:
        assert SECRET not in repr(result)


def _toml(tables: dict[str, dict[str, Any]]) -> str:
    """A TOML document; JSON scalars are TOML scalars (NaN is not: a decode error)."""
    return "".join(f"[{json.dumps(group)}]\n" + "".join(
        f"{json.dumps(key)} = {json.dumps(value)}\n" for key, value in fields.items())
        for group, fields in tables.items())


toml_values = st.one_of(st.none().map(lambda _: ""), st.booleans(), st.integers(-2**63, 2**63),
                        st.floats(), st.text(max_size=20))
fields = st.sampled_from(sorted({n.removeprefix("RECSTREAM_").lower().split("_", 1)[-1]
                                 for n in KNOWN})) | st.text(max_size=10)


@given(st.dictionaries(st.sampled_from(GROUPS) | st.text(max_size=8),
                       st.dictionaries(fields, toml_values, max_size=4), max_size=3)
       .map(_toml) | st.text(max_size=200))
def test_any_config_file_loads_or_fails_naming_the_file(content: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "recstream.toml"
        path.write_text(content)
        result = _load({"RECSTREAM_CONFIG": str(path)})
    assert isinstance(result, Settings) or str(path) in result
