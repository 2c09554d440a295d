"""Reading TOML configuration into typed values, with errors that name the key, the value and what is valid.

Both the agent and the server load their configs through this, so a mistyped key reads the same way
everywhere: ``agent.toml: [mqtt] port = 70000: out of range; valid: 1..65535``. Unknown keys are
errors, not silently ignored: a misspelt ``resend_after_s`` must not quietly leave the default.
"""

from __future__ import annotations

import math
import tomllib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from battery_trace.bounded_read import UnreadableInput, read_bounded

MAX_CONFIG_BYTES = 1024 * 1024
_MISSING: Any = object()


class ConfigError(ValueError):
    pass


def load_toml(path: Path) -> dict[str, Any]:
    try:
        data = read_bounded(path, MAX_CONFIG_BYTES)
    except UnreadableInput as exc:
        raise ConfigError(f"config file: {exc}") from None
    try:
        return tomllib.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


class Section:
    """One table of a config file. Every read is checked; ``finish`` refuses keys nobody read."""

    def __init__(self, data: Any, name: str, origin: str, base_dir: Path) -> None:
        self.origin = origin
        self.name = name
        self.base_dir = base_dir
        if not isinstance(data, dict):
            raise ConfigError(f"{origin}: [{name}] must be a table, got {_show(data)}")
        self.data = data
        self._read: set[str] = set()

    @classmethod
    def root(cls, data: dict[str, Any], origin: str, base_dir: Path) -> Section:
        return cls(data, "", origin, base_dir)

    def _where(self, key: str) -> str:
        return f"{self.origin}: [{self.name}] {key}" if self.name else f"{self.origin}: {key}"

    def error(self, key: str, problem: str) -> ConfigError:
        value = self.data.get(key, _MISSING)
        shown = "" if value is _MISSING else f" = {_show(value)}"
        return ConfigError(f"{self._where(key)}{shown}: {problem}")

    def _get(self, key: str, default: Any) -> tuple[bool, Any]:
        """(present, value): a key that is absent yields its default, unchecked."""
        self._read.add(key)
        if key in self.data:
            return True, self.data[key]
        if default is _MISSING:
            raise self.error(key, "is required")
        return False, default

    def text(self, key: str, default: Any = _MISSING, choices: Sequence[str] = ()) -> Any:
        present, value = self._get(key, default)
        if not present:
            return value
        if not isinstance(value, str) or not value.strip():
            raise self.error(key, "must be non-empty text")
        if choices and value not in choices:
            raise self.error(key, f"is not valid; valid: {', '.join(choices)}")
        return value

    def text_list(self, key: str, default: Any = _MISSING) -> Any:
        present, value = self._get(key, default)
        if not present:
            return value
        if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
            raise self.error(key, 'must be a non-empty list of text, e.g. ["A", "B"]')
        return tuple(value)

    def integer(self, key: str, default: Any = _MISSING, low: int = 0, high: int = 2**63 - 1) -> Any:
        present, value = self._get(key, default)
        if not present:
            return value
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(key, f"must be a whole number; valid: {low}..{high}")
        if not low <= value <= high:
            raise self.error(key, f"is out of range; valid: {low}..{high}")
        return value

    def number(self, key: str, default: Any = _MISSING, low: float = 0.0, high: float = math.inf) -> Any:
        present, value = self._get(key, default)
        if not present:
            return value
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise self.error(key, f"must be a number; valid: {low}..{high}")
        if not low <= value <= high:
            raise self.error(key, f"is out of range; valid: {low}..{high}")
        return float(value)

    def boolean(self, key: str, default: Any = _MISSING) -> Any:
        present, value = self._get(key, default)
        if present and not isinstance(value, bool):
            raise self.error(key, "must be true or false")
        return value

    def path(self, key: str, default: Any = _MISSING) -> Any:
        """A file path; relative paths are taken from the config file's folder, not the working directory."""
        value = self.text(key, default)
        if value is None:
            return None
        return (self.base_dir / Path(value).expanduser()).resolve()

    def section(self, key: str, required: bool = False) -> Section:
        _, value = self._get(key, _MISSING if required else {})
        sub = f"{self.name}.{key}" if self.name else key
        return Section(value, sub, self.origin, self.base_dir)

    def sections(self, key: str) -> list[Section]:
        """An array of tables (``[[key]]``)."""
        _, value = self._get(key, [])
        if not isinstance(value, list):
            raise self.error(key, "must be an array of tables ([[...]])")
        prefix = f"{self.name}.{key}" if self.name else key
        return [Section(item, f"{prefix}[{i}]", self.origin, self.base_dir) for i, item in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self._read)
        if unknown:
            valid = ", ".join(sorted(self._read)) or "none"
            where = f"[{self.name}]" if self.name else "the top level"
            raise ConfigError(f"{self.origin}: unknown key {unknown[0]!r} in {where}; valid: {valid}")


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
