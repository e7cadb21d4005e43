"""The budget a search must meet, parsed once from the ``--budget`` text.

A budget is one or several limits joined by commas: ``sparsity=0.7``, ``params=75%``, ``params=100M,flops=60%``,
``latency=70%@512``. Each limit is a value or a range (``params=60%:80%``: a Pareto search over that one limit).

- ``sparsity``: mean sparsity of the prunable weights, in [0, 1) (the sparsity space only, and alone);
- ``params``: parameters of the whole model (``4.5M``, suffixes K/M/B);
- ``flops``: forward FLOPs per token at a sequence length (``250M``, suffixes K/M/G/T; ``pruners.width.counting``);
- ``memory``: weight bytes plus the KV cache at a context (``300MB``, ``256MiB``; suffixes KB/MB/GB, KiB/MiB/GiB);
- ``latency``: a measured prefill of batch 1 on this device (``40ms``, ``0.04s``; ``pruners.width.latency``).

Every value except sparsity may be a share of the dense model (``75%``). ``@N`` after a flops, memory or latency
value sets its sequence length or context (default: the search's sequence length).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from prunesearch.safety import UserError

KINDS = ("sparsity", "params", "flops", "memory", "latency")
WIDTH_KINDS = ("params", "flops", "memory", "latency")  # what removing heads and channels changes
SUFFIXES = {
    "params": {"K": 1e3, "M": 1e6, "B": 1e9},
    "flops": {"K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12},
    "memory": {"B": 1.0, "KB": 1e3, "MB": 1e6, "GB": 1e9, "KIB": 2.0 ** 10, "MIB": 2.0 ** 20, "GIB": 2.0 ** 30},
    "latency": {"MS": 1.0, "S": 1e3},  # milliseconds
}
SHAPE = "sparsity=0.7, params=5M, params=75%, flops=60%, latency=70%@512 or a range such as sparsity=0.6:0.8"


def _number(kind: str, end: str, text: str) -> tuple[float, bool]:
    """(value, is a share of the dense model) of one end of a limit; absolute values in the kind's unit."""
    share = end.endswith("%")
    body, scale = (end[:-1], 1.0) if share else (end, 1.0)
    if not share and kind in SUFFIXES:
        m = re.fullmatch(r"(.*?)([A-Za-z]+)", end)
        if m:
            unit = m.group(2).upper()
            if unit not in SUFFIXES[kind]:
                raise UserError(f"budget {text!r}: unknown unit {m.group(2)!r} for {kind} (use "
                                f"{', '.join(SUFFIXES[kind])} or a share such as 75%)")
            body, scale = m.group(1), SUFFIXES[kind][unit]
    try:
        v = float(body)
    except ValueError:
        raise UserError(f"budget {text!r}: {end!r} is not a number") from None
    if not math.isfinite(v):
        raise UserError(f"budget {text!r}: {end!r} is not a number")
    if kind == "sparsity":
        if share or not 0.0 <= v < 1.0:
            raise UserError(f"budget {text!r}: sparsity must be in [0, 1)")
    elif v <= 0 or (share and v > 100):
        raise UserError(f"budget {text!r}: {kind} must be a positive amount such as 4.5M or a share in (0%, 100%]")
    return (v / 100 if share else v * scale), share


@dataclass(frozen=True)
class Limit:
    """One limit of a budget: its kind, one or two ends (a range), each absolute or a share of the dense model,
    and the sequence length or context it is counted at (None: the search's)."""

    kind: str
    ends: tuple[float, ...]
    shares: tuple[bool, ...]
    tokens: int | None
    text: str

    @property
    def ranged(self) -> bool:
        return len(self.ends) == 2

    def resolve(self, dense: float) -> tuple[float, float]:
        """(lowest, highest) absolute value given the dense model's ``dense`` amount of this kind."""
        values = sorted(e * dense if s else e for e, s in zip(self.ends, self.shares))
        return values[0], values[-1]


@dataclass(frozen=True)
class Budget:
    """The parsed ``--budget``: its limits in the order given."""

    limits: tuple[Limit, ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Check the form, kinds, numbers and combination of a budget (nothing that needs the model)."""
        limits = []
        parts = text.split(",")
        for n, part in enumerate(parts):
            kind, sep, value = part.strip().partition("=")
            if not sep and n > 0:
                raise UserError(f"budget {text!r}: {part!r} is not a number nor a kind=value limit (limits are "
                                "joined by commas; decimals take a point)")
            value, at, tokens = value.partition("@")
            ends = value.split(":")
            if not sep or len(ends) > 2 or not all(e.strip() for e in ends):
                raise UserError(f"budget must look like {SHAPE}, got {text!r}")
            if kind not in KINDS:
                raise UserError(f"unknown budget kind {kind!r}; this version supports {'=…, '.join(KINDS)}=…")
            if at and (kind in ("sparsity", "params") or not tokens.isdigit() or int(tokens) < 1):
                raise UserError(f"budget {text!r}: @N (a positive token count) follows only a flops, memory or "
                                "latency value")
            numbers = [_number(kind, e.strip(), text) for e in ends]
            if len(ends) == 2 and ends[0].strip() == ends[1].strip():
                raise UserError(f"budget range {text!r} has equal ends; give a single budget instead")
            limits.append(Limit(kind, tuple(v for v, _ in numbers), tuple(s for _, s in numbers),
                                int(tokens) if at else None, part.strip()))
        kinds = [lim.kind for lim in limits]
        if len(set(kinds)) < len(kinds):
            raise UserError(f"budget {text!r} limits the same kind twice")
        if "sparsity" in kinds and len(kinds) > 1:
            raise UserError(f"budget {text!r}: sparsity= is a budget of its own; combine params, flops, memory "
                            "and latency instead")
        if sum(lim.ranged for lim in limits) > 1:
            raise UserError(f"budget {text!r}: only one limit may be a range (the Pareto search trades fitness "
                            "against it)")
        return cls(tuple(limits), text)

    @property
    def kinds(self) -> tuple[str, ...]:
        return tuple(lim.kind for lim in self.limits)

    @property
    def ranged(self) -> Limit | None:
        """The limit given as a range, if any (it makes the study multi-objective)."""
        return next((lim for lim in self.limits if lim.ranged), None)

    def limit(self, kind: str) -> Limit | None:
        return next((lim for lim in self.limits if lim.kind == kind), None)
