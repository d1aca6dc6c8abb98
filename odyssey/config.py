"""Typed YAML configs: every command's config is a pydantic model loaded with `yaml.safe_load`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

ConfigT = TypeVar("ConfigT", bound="StageConfig")


class ConfigError(ValueError):
    """A config file is missing, unreadable or does not match its typed class."""


class StageConfig(BaseModel):
    """Base class of every stage config: unknown keys are errors, not silently ignored."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    @classmethod
    def load(cls: type[ConfigT], path: str | os.PathLike | None = None, **overrides: Any) -> ConfigT:
        """Read `path` (YAML) if given, then apply non-None `overrides` (CLI flags win)."""
        data: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            try:
                loaded = yaml.safe_load(path.read_text())
            except OSError as exc:
                raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from exc
            except yaml.YAMLError as exc:
                raise ConfigError(f"{path}: invalid YAML: {exc}") from exc
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{path}: a config must be a mapping, got {type(loaded).__name__}")
            data = loaded or {}
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            where = str(path) if path is not None else cls.__name__
            raise ConfigError(f"{where}: {exc}") from exc
