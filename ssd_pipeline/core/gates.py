"""Gate checks shared by the tests and the CLI: one message format, "got X, expected >= Y"."""

from __future__ import annotations


class GateFailure(AssertionError):
    """A measured value missed its threshold (AssertionError so pytest reports it as a fail)."""


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"


def require_at_least(name: str, got: float, expected: float, source: str = "") -> None:
    if not got >= expected:  # NaN fails too
        raise GateFailure(f"{name}: got {_fmt(got)}, expected >= {_fmt(expected)}"
                          + (f" [{source}]" if source else ""))


def require_at_most(name: str, got: float, expected: float, source: str = "") -> None:
    if not got <= expected:
        raise GateFailure(f"{name}: got {_fmt(got)}, expected <= {_fmt(expected)}"
                          + (f" [{source}]" if source else ""))
