"""Where settings come from: ``RECSTREAM_*`` variables of a given environment, and the
TOML file ``RECSTREAM_CONFIG`` names. Both are pydantic-settings sources;
``common.infra.settings.load_settings`` puts the environment first, so it wins.

A variable names its field with the prefix, the group and the field joined by single
underscores. Field names hold underscores too, so only the first one after the group
separates (pydantic-settings' nested delimiter ``_`` split at most once):
``RECSTREAM_KAFKA_SASL_PASSWORD_FILE`` is ``kafka.sasl_password_file``. A list field's
value is comma-separated, never JSON.

>>> from common.infra.settings import Settings
>>> source = RecstreamEnvSource(Settings, {"RECSTREAM_KAFKA_SASL_PASSWORD_FILE": "/run/pw",
...                                        "RECSTREAM_MODEL_HIDDEN_DIMS": "128, 64,",
...                                        "RECSTREAM_HOME": "/srv", "recstream_home": "x"})
>>> values = source()
>>> values["home"], values["kafka"], values["model"]
('/srv', {'sasl_password_file': '/run/pw'}, {'hidden_dims': ['128', '64']})
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_origin

from pydantic.fields import FieldInfo
from pydantic_settings import EnvSettingsSource, TomlConfigSettingsSource

if TYPE_CHECKING:
    from pydantic_settings import BaseSettings

PREFIX = "RECSTREAM_"
CONFIG_VARIABLE = PREFIX + "CONFIG"


class RecstreamEnvSource(EnvSettingsSource):
    """``RECSTREAM_*`` variables from ``environ`` (any mapping: tests pass a dict), with
    the prefix and the nested delimiter of ``settings_cls.model_config``."""

    def __init__(self, settings_cls: type[BaseSettings], environ: Mapping[str, str]) -> None:
        self._environ = environ  # read by _load_env_vars, which the base __init__ calls
        super().__init__(settings_cls)

    def _load_env_vars(self) -> Mapping[str, str | None]:
        # Upper-case names only, lower-cased for pydantic-settings' case-insensitive lookup:
        # recstream never read ``recstream_home``, and an unknown-name check upstream only
        # knows the upper-case names.
        return {name.lower(): value for name, value in self._environ.items()
                if name.startswith(PREFIX)}

    def explode_env_vars(self, field_name: str, field: FieldInfo,
                         env_vars: Mapping[str, str | None]) -> dict[str, Any]:
        """A group's variables as its fields; a list field's value split at its commas
        (blank parts dropped: ``""`` is the empty list)."""
        values = super().explode_env_vars(field_name, field, env_vars)
        fields = getattr(field.annotation, "model_fields", {})
        for name, value in values.items():
            if isinstance(value, str) and name in fields \
                    and get_origin(fields[name].annotation) is tuple:
                values[name] = [part.strip() for part in value.split(",") if part.strip()]
        return values


def config_file_source(settings_cls: type[BaseSettings], path: str) -> TomlConfigSettingsSource:
    """The TOML file's settings. Raises ``OSError`` when the file cannot be read and
    ``tomllib.TOMLDecodeError`` (a ``ValueError``) when it is not TOML."""
    # pydantic-settings skips a missing file silently; a file the user named must exist.
    with Path(path).open("rb"):
        pass
    return TomlConfigSettingsSource(settings_cls, toml_file=Path(path))
