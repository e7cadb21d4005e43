"""Per-layer sparsity configs: the JSON schema users write and the search exports (also read from YAML).

Schema::

    {"sparsity": {"0": 0.55, "1": 0.6, "model.layers.2.mlp.down_proj": 0.7},
     "default": 0.5,
     "pattern": "unstructured"}

Keys are block indices or full projection names; a projection name wins over its block. Projections not covered
take ``default``, or stay dense when there is none. ``pattern`` is ``unstructured`` (default) or ``N:M``; with
``N:M`` every value must be a multiple of 1/M and a layer at k/M is pruned k:M (so ``{"default": 0.5,
"pattern": "2:4"}`` is plain 2:4).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from pruners.masks import Target, check_pattern_fits_layout, parse_pattern, sparsity_problem
from pruners.registry import ModelLayout
from prunesearch.safety import UserError, first_line


@dataclass
class SparsityConfig:
    """A per-layer target: explicit values by block or projection, a default, and a pattern."""

    sparsity: dict[str, float] = field(default_factory=dict)
    default: float | None = None
    pattern: str = "unstructured"

    def __post_init__(self):
        self.m = parse_pattern(self.pattern)
        for key, value in [*self.sparsity.items(), ("default", self.default)]:
            if value is None:
                continue
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise UserError(f"sparsity for {key!r} must be a number, got {value!r}")
            problem = sparsity_problem(float(value), self.m)
            if problem:
                raise UserError(problem)

    @classmethod
    def uniform(cls, sparsity: float | None = None, pattern: str = "unstructured") -> SparsityConfig:
        """Every projection at ``sparsity``; for N:M without a sparsity, the pattern's own N/M."""
        m = parse_pattern(pattern)
        if sparsity is None:
            if not m:
                raise UserError("give a sparsity, or an N:M pattern")
            n = int(pattern.split(":")[0])
            sparsity = n / m
        return cls({}, float(sparsity), pattern)

    @classmethod
    def from_dict(cls, data: dict) -> SparsityConfig:
        unknown = set(data) - {"sparsity", "default", "pattern", "meta"}
        if unknown:
            raise UserError(f"unknown config keys {sorted(unknown)}; allowed: sparsity, default, pattern, meta")
        values = data.get("sparsity", {})
        if not isinstance(values, dict):
            raise UserError("config 'sparsity' must map block indices or module names to numbers")
        return cls({str(k): v for k, v in values.items()}, data.get("default"), data.get("pattern", "unstructured"))

    @classmethod
    def load(cls, path: str | Path) -> SparsityConfig:
        return cls.from_dict(read_config(path))

    def to_dict(self) -> dict:
        out: dict = {"sparsity": dict(self.sparsity)}
        if self.default is not None:
            out["default"] = self.default
        out["pattern"] = self.pattern
        return out

    def resolve(self, lay: ModelLayout) -> dict[str, Target]:
        """The target of every projection of the model; unknown keys, or an N:M pattern that does not fit every
        projection, raise naming what the model has."""
        if self.m:
            check_pattern_fits_layout(lay, self.m)
        names = lay.projection_names()
        known = set(names)
        targets: dict[str, float | None] = {name: self.default for name in names}
        bad = []
        for key in sorted(self.sparsity, key=lambda k: not k.isdigit()):  # blocks first, projections override
            value = float(self.sparsity[key])
            if key.isdigit():
                if int(key) >= lay.num_blocks:
                    bad.append(key)
                    continue
                for name in lay.projections[int(key)]:
                    targets[name] = value
            elif key in known:
                targets[key] = value
            else:
                bad.append(key)
        if bad:
            raise UserError(
                f"config names layers the model does not have: {bad}; it has blocks 0-{lay.num_blocks - 1} and "
                f"projections like {names[0]}"
            )
        return {name: Target(v if v is not None else 0.0, self.m) for name, v in targets.items()}


def read_config(path: str | Path) -> dict:
    """The object a config file holds (YAML for .yaml/.yml, else JSON): a sparsity or a width config."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"config {path} cannot be read as text ({first_line(e)})") from e
    if path.suffix in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise UserError(f"config {path} is not valid YAML: {' '.join(str(e).split())}") from e
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise UserError(f"config {path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise UserError(f"config {path} must hold a JSON (or YAML) object")
    return data
