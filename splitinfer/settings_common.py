"""What the two daemons' settings share: the log level, and renamed settings that keep working for a while.

Both daemons (:class:`cloud_server.settings.CloudSettings`, :class:`edge_agent.settings.EdgeSettings`) spell a
concept the same way: ``grace_s`` (drain time on SIGTERM), ``log_level`` (``debug`` .. ``critical``, any
case), ``max_inflight`` (requests admitted at once, queued or running). A setting that was spelled otherwise is
listed in its class's ``RENAMED`` (old field name -> new; both classes derive from :class:`RenamingSettings`):
the old field name (a keyword argument, a config file key), the old environment variable and the old CLI flag
are still accepted, with a :class:`DeprecationWarning` and a logged warning that name the new spelling. The
usual order holds: an argument beats a variable, which beats a config file; at one level the new name wins.
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, model_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource

log = logging.getLogger("splitinfer.settings")

def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


LogLevel = Annotated[Literal["debug", "info", "warning", "error", "critical"], BeforeValidator(_lower)]
"""A log level as both daemons take it: any case in, lower case stored (``logging`` and uvicorn accept it)."""


def warn_renamed(old: str, new: str, ignored: bool = False) -> None:
    """Say that ``old`` is deprecated in favour of ``new`` (or, with ``ignored``, that ``new`` was also given and
    wins): a :class:`DeprecationWarning` and a warning log line."""
    message = (f"{old} is deprecated and ignored: {new} is also given" if ignored
               else f"{old} is deprecated; use {new}")
    warnings.warn(message, DeprecationWarning, stacklevel=4)
    log.warning(message)


def rename_fields(data: Any, renamed: Mapping[str, str]) -> Any:
    """For a ``model_validator(mode="before")``: old field names in ``data`` become the new ones (warned)."""
    if not isinstance(data, dict) or not any(old in data for old in renamed):
        return data
    data = dict(data)
    for old, new in renamed.items():
        if old in data:
            value = data.pop(old)
            if new in data:
                warn_renamed(old, new, ignored=True)
            else:
                warn_renamed(old, new)
                data[new] = value
    return data


class RenamedEnvSource(PydanticBaseSettingsSource):
    """The old environment variables (``PREFIX + OLD``) of renamed fields, as values of the new fields.

    Placed right after the environment source: a new variable, or an explicit argument, wins over an old one."""

    def __init__(self, settings_cls: type[BaseSettings], prefix: str, renamed: Mapping[str, str]):
        super().__init__(settings_cls)
        self.prefix = prefix
        self.renamed = dict(renamed)

    def get_field_value(self, field: FieldInfo, field_name: str) -> tuple[Any, str, bool]:
        return None, field_name, False  # unused: __call__ reads the variables

    def __call__(self) -> dict[str, Any]:
        environ = {k.upper(): v for k, v in os.environ.items()}
        values: dict[str, Any] = {}
        for old, new in self.renamed.items():
            old_var, new_var = f"{self.prefix}{old}".upper(), f"{self.prefix}{new}".upper()
            if old_var not in environ:
                continue
            if new_var in environ:
                warn_renamed(old_var, new_var, ignored=True)
                continue
            warn_renamed(old_var, new_var)
            values[new] = environ[old_var]
        return values


class RenamingSettings(BaseSettings):
    """Base of the daemons' settings: accepts the old names in ``RENAMED`` (see the module docstring)."""

    RENAMED: ClassVar[dict[str, str]] = {}  # old field name -> new field name

    def __init__(self, **values: Any) -> None:
        # explicit arguments first, so that an old-named argument still beats an environment variable
        super().__init__(**rename_fields(values, self.RENAMED))

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, env_settings, cls.renamed_env_source(settings_cls), dotenv_settings,
                file_secret_settings)

    @classmethod
    def renamed_env_source(cls, settings_cls: type[BaseSettings]) -> RenamedEnvSource:
        """The old environment variables, for a class that lists its own sources (right after ``env_settings``)."""
        return RenamedEnvSource(settings_cls, cls.model_config.get("env_prefix", ""), cls.RENAMED)

    @model_validator(mode="before")
    @classmethod
    def _renamed_keys(cls, data: Any) -> Any:
        """Old names from the other sources (a config file)."""
        return rename_fields(data, cls.RENAMED)
