"""The expectations data file: every threshold and tolerance, with its source.

Values are addressed by dotted keys (``parity.fp32.raw_rel_err_max``); the command line
overrides them with ``KEY=VALUE`` strings (``--expect``).
"""

from __future__ import annotations

import copy
import tomllib
from pathlib import Path
from typing import Any

from .errors import UserError

DEFAULT_PATH = Path(__file__).resolve().parents[2] / "fixtures" / "expectations.toml"


class Expectations:
    """Read-only view of the expectations file with command-line overrides applied."""

    def __init__(self, data: dict[str, Any], path: Path, overrides: dict[str, Any]) -> None:
        self._data = data
        self.path = path
        self.overrides = overrides

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: list[str] | None = None
             ) -> Expectations:
        path = Path(path) if path else DEFAULT_PATH
        try:
            data = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise UserError(f"expectations file not found: {path}") from None
        except tomllib.TOMLDecodeError as e:
            raise UserError(f"expectations file {path} is not valid TOML: {e}") from None
        applied: dict[str, Any] = {}
        data = copy.deepcopy(data)
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep or not key.strip():
                raise UserError(f"--expect {item!r}: expected KEY=VALUE, "
                                "e.g. accuracy.ssd300_coco.map_50_min=0.44")
            key = key.strip()
            node = data
            *parents, leaf = key.split(".")
            for part in parents:
                node = node.get(part) if isinstance(node, dict) else None
                if node is None:
                    break
            if not isinstance(node, dict) or leaf not in node:
                raise UserError(f"--expect {item!r}: no key {key!r} in {path}")
            node[leaf] = _parse_value(raw.strip(), type(node[leaf]), item)
            applied[key] = node[leaf]
        return cls(data, path, applied)

    def get(self, key: str) -> Any:
        node: Any = self._data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise UserError(f"expectations file {self.path} has no {key!r}")
            node = node[part]
        return node

    def number(self, key: str) -> float:
        """A numeric threshold; a non-number is an error naming the key."""
        value = self.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UserError(f"expectations {key!r} in {self.path} must be a number, got {value!r}")
        return float(value)

    def gate_keys(self) -> list[str]:
        """Every gate of the file: each value but a table's ``source``/``decimals`` and the
        tables marked ``informational = true`` (reference rows kept for comparison) or
        ``settings = true`` (choices the runs read, such as the calibration method)."""
        keys: list[str] = []

        def walk(node: dict[str, Any], prefix: str) -> None:
            if node.get("informational") is True or node.get("settings") is True:
                return
            for k, v in node.items():
                if isinstance(v, dict):
                    walk(v, f"{prefix}{k}.")
                elif k not in ("source", "decimals"):
                    keys.append(prefix + k)

        walk(self._data, "")
        return keys

    def is_measured_only(self, key: str) -> bool:
        """True where the file says the value is recorded and reported but not gated."""
        return self.get(key) == MEASURED_ONLY

    def optional(self, key: str) -> Any:
        """The value at ``key``, or None where the file has none."""
        try:
            return self.get(key)
        except UserError:
            return None

    def source(self, key: str) -> str:
        """The ``source`` line of the table holding ``key``."""
        table = key.rsplit(".", 1)[0]
        try:
            return str(self.get(f"{table}.source"))
        except UserError:
            return "(no source stated)"


MEASURED_ONLY = "measured_only"  # a number that is recorded and reported, never gated


def _parse_value(raw: str, kind: type, item: str) -> Any:
    if kind is str and raw != MEASURED_ONLY:  # e.g. measured_only -> a real floor
        try:
            return float(raw)
        except ValueError:
            return raw
    if kind in (int, float):
        if raw == MEASURED_ONLY:
            return raw
        try:
            return float(raw) if kind is float or "." in raw or "e" in raw.lower() else int(raw)
        except ValueError:
            raise UserError(f"--expect {item!r}: {raw!r} is not a number") from None
    return raw
