"""The one typed settings object, read from ``RECSTREAM_*`` environment variables.

Top-level fields map to ``RECSTREAM_<FIELD>`` (``RECSTREAM_HOME``); grouped fields
to ``RECSTREAM_<GROUP>_<FIELD>`` (``RECSTREAM_KAFKA_BOOTSTRAP``,
``RECSTREAM_MODEL_EMBEDDING_DIM``); list values are comma-separated. An optional TOML
file named by ``RECSTREAM_CONFIG`` supplies values first; environment variables override
it. An unknown ``RECSTREAM_*`` variable or an invalid value fails at start-up with a
message naming the variable. The groups are in ``common.infra.settings_groups``, the
sources in ``common.infra.settings_sources``.

>>> s = load_settings({"RECSTREAM_MODEL_EMBEDDING_DIM": "16"})
>>> s.model.embedding_dim
16
>>> try:
...     load_settings({"RECSTREAM_MODEL_EMBEDDING_DIM": "many"})
... except SettingsError as exc:
...     print(str(exc)[:47])
RECSTREAM_MODEL_EMBEDDING_DIM='many': Input sho
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from common.infra.settings_groups import (
    EvalSettings,
    IndexSettings,
    KafkaSettings,
    ModelSettings,
    NightlySettings,
    PublisherSettings,
    RedisSettings,
    ServingSettings,
    StreamSettings,
    TrainSettings,
)
from common.infra.settings_sources import (
    CONFIG_VARIABLE,
    PREFIX,
    RecstreamEnvSource,
    config_file_source,
)

# The sources of the load_settings call in progress (none: Settings() is the defaults).
_LOADING: ContextVar[tuple[PydanticBaseSettingsSource, ...]] = ContextVar(
    "_LOADING", default=())


class SettingsError(ValueError):
    """A setting is missing or invalid; the message names the variable."""


class Settings(BaseSettings):
    """Everything recstream can be configured with.

    ``Settings()`` (and ``Settings(**fields)``) is the defaults, whatever the environment:
    only ``load_settings`` reads the environment and the config file.
    """

    # No JSON in variables: list values are comma-separated (see settings_sources).
    model_config = SettingsConfigDict(extra="forbid", frozen=True, env_prefix=PREFIX,
                                      env_nested_delimiter="_", env_nested_max_split=1,
                                      enable_decoding=False)

    home: Path = Path("./var")
    data_cache: Path = Path.home() / ".cache" / "recstream"
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "WARNING"
    log_format: Literal["text", "json"] = "text"
    kafka: KafkaSettings = KafkaSettings()
    redis: RedisSettings = RedisSettings()
    model: ModelSettings = ModelSettings()
    train: TrainSettings = TrainSettings()
    stream: StreamSettings = StreamSettings()
    eval: EvalSettings = EvalSettings()
    index: IndexSettings = IndexSettings()
    publisher: PublisherSettings = PublisherSettings()
    serving: ServingSettings = ServingSettings()
    nightly: NightlySettings = NightlySettings()

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def events_dir(self) -> Path:
        return self.home / "events"

    @property
    def checkpoints_dir(self) -> Path:
        return self.home / "checkpoints"

    @property
    def indexes_dir(self) -> Path:
        return self.home / "indexes"

    @property
    def run_dir(self) -> Path:
        """Pid and address files of the embedded servers."""
        return self.home / "run"

    def with_overrides(self, **groups: dict[str, Any]) -> Settings:
        """A copy with some group fields replaced (validated), e.g. ``train={"seed": 1}``."""
        data = self.model_dump()
        for group, values in groups.items():
            data[group].update(values)
        return Settings.model_validate(data)

    def model_hash(self) -> str:
        """Short hash of the model-defining settings, recorded in each version's meta."""
        blob = json.dumps(self.model.model_dump(), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:12]

    @classmethod
    def settings_customise_sources(
            cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # pydantic-settings builds the sources inside the constructor from this hook alone,
        # and would read os.environ; load_settings hands over the ones for its own mapping.
        return init_settings, *_LOADING.get()


_GROUPS = {name for name, f in Settings.model_fields.items()
           if isinstance(f.default, BaseModel)}


def _variables() -> dict[str, tuple[str, ...]]:
    """Every variable but ``RECSTREAM_CONFIG``, with the field it sets (group, field)."""
    fields: dict[str, tuple[str, ...]] = {}
    for name, f in Settings.model_fields.items():
        if name in _GROUPS:
            fields.update({f"{PREFIX}{name}_{sub}".upper(): (name, sub)
                           for sub in type(f.default).model_fields})
        else:
            fields[f"{PREFIX}{name}".upper()] = (name,)
    return fields


def env_var_names() -> list[str]:
    """Every environment variable the settings object reads."""
    return [CONFIG_VARIABLE, *_variables()]


def load_settings(env: Mapping[str, str] | None = None) -> Settings:
    """Read settings from the environment (and ``RECSTREAM_CONFIG``'s TOML file)."""
    env = os.environ if env is None else env
    config_path = env.get(CONFIG_VARIABLE) or None
    sources: list[PydanticBaseSettingsSource] = [RecstreamEnvSource(Settings, env)]
    if config_path:
        try:
            sources.append(config_file_source(Settings, config_path))
        except (OSError, ValueError) as exc:  # ValueError: tomllib.TOMLDecodeError
            raise SettingsError(f"{CONFIG_VARIABLE}={config_path!r}: {exc}") from exc
    variables = _variables()
    for key in env:
        if key.startswith(PREFIX) and key != CONFIG_VARIABLE and key not in variables:
            raise SettingsError(f"{key}: unknown setting (known: see README, Configuration)")
    given = {variables[key]: key for key in env if key in variables}
    token = _LOADING.set(tuple(sources))
    try:
        return Settings()
    except ValidationError as exc:
        raise SettingsError(_message(exc.errors()[0], given, config_path)) from None
    finally:
        _LOADING.reset(token)


def _message(err: ErrorDetails, given: dict[tuple[str, ...], str],
             config_path: str | None) -> str:
    """A validation error in one line, naming the variable, or the file and key, at fault;
    never a secret's value."""
    loc = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    # An error on a default (a setting another one requires) names the variable to set.
    name = given.get(loc) or (f"{config_path}: {'.'.join(loc)}" if config_path
                              else (PREFIX + "_".join(loc)).upper())
    value = err.get("input")
    secret = loc[-1:] in (("url",), ("password",), ("sasl_password",))
    shown_as_given = loc in given or bool(config_path)  # a default's value says nothing
    shown = f"={value!r}" if isinstance(value, str | int | float) and shown_as_given \
        and not secret else ""
    return f"{name}{shown}: {err['msg']}"
