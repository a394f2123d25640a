"""Gate checks shared by the tests and the CLI: one message format, "got X, expected >= Y"."""

from __future__ import annotations

from dataclasses import dataclass

from .expectations import Expectations


class GateFailure(AssertionError):
    """A measured value missed its threshold (AssertionError so pytest reports it as a fail)."""


def _fmt(v: float) -> str:
    return f"{v:.4g}" if abs(v) < 1e-3 and v != 0 else f"{v:.4f}"


def require_at_least(name: str, got: float, expected: float, source: str = "",
                     decimals: int | None = None) -> None:
    """``got >= expected``. With ``decimals``, a published threshold is met at the precision it
    was published with: ``got`` rounded as its publisher rounds (mmdet's CocoMetric reports
    mAP to 3 decimals, so a true 0.4358 reported as 0.436 meets 0.436)."""
    seen = round(got, decimals) if decimals is not None else got
    if not seen >= expected:  # NaN fails too
        at = (f" ({seen:.{decimals}f} at the published {decimals} decimals)"
              if decimals is not None else "")
        raise GateFailure(f"{name}: got {_fmt(got)}{at}, expected >= {_fmt(expected)}"
                          + (f" [{source}]" if source else ""))


def require_at_most(name: str, got: float, expected: float, source: str = "") -> None:
    if not got <= expected:
        raise GateFailure(f"{name}: got {_fmt(got)}, expected <= {_fmt(expected)}"
                          + (f" [{source}]" if source else ""))


def direction(key: str) -> str:
    """'>=' or '<=': read from the key's name, the convention of the expectations file
    (``*_min``, ``*_min_ratio``: a floor; ``*_max``, ``*_atol``, ``*_atol_px``: a ceiling)."""
    leaf = key.rsplit(".", 1)[-1]
    if leaf.endswith(("_min", "_min_ratio")):
        return ">="
    if leaf.endswith(("_max", "_atol", "_atol_px")):
        return "<="
    raise ValueError(f"expectations key {key!r} names no direction (*_min, *_max, *_atol)")


@dataclass(frozen=True)
class Verdict:
    """What one gate said about one measured value: PASS, FAIL or NOT RUN (with why)."""

    key: str
    case: str  # what was measured, e.g. "tvm/fp32" or "tvm/fp32 batch 8"
    status: str
    detail: str

    def line(self) -> str:
        return f"{self.status:<8} {self.key} [{self.case}]: {self.detail}"


def parity_table(precision: str) -> str:
    """The tolerance table of a precision's parity: fp32 tight, int8 its own, bf16/fp16 the
    reduced-precision one."""
    return {"fp32": "parity.fp32", "int8": "parity.int8"}.get(precision, "parity.reduced")


def drop_key(expectations: Expectations, backend: str, precision: str) -> str:
    """The AP-drop gate of ``backend`` at ``precision``: a backend's own entry (the int8 peers
    are measured only) or the precision's."""
    own = f"accuracy.drop_vs_torch.{backend}_{precision}_max"
    return own if expectations.optional(own) is not None else \
        f"accuracy.drop_vs_torch.{precision}_max"


def judge(expectations: Expectations, key: str, case: str, got: float) -> Verdict:
    """Apply the gate ``key`` of the expectations file to ``got``: the same check, threshold,
    rounding rule and message the tests apply (they call :func:`require`)."""
    if expectations.is_measured_only(key):
        return Verdict(key, case, "NOT RUN", f"measured only, not gated: got {_fmt(got)}")
    try:
        require(expectations, key, case, got)
    except GateFailure as e:
        return Verdict(key, case, "FAIL", str(e).split(": ", 1)[1])
    return Verdict(key, case, "PASS", f"got {_fmt(got)}, expected {direction(key)} "
                                      f"{_fmt(expectations.number(key))}")


def require(expectations: Expectations, key: str, name: str, got: float) -> None:
    """Raise :class:`GateFailure` unless ``got`` meets the gate ``key`` (its direction from the
    key's name; a ``decimals`` entry in its table means: compare at that published precision)."""
    threshold = expectations.number(key)
    source = expectations.source(key)
    if direction(key) == ">=":
        decimals = expectations.optional(f"{key.rsplit('.', 1)[0]}.decimals")
        require_at_least(name, got, threshold, source, decimals)
    else:
        require_at_most(name, got, threshold, source)
