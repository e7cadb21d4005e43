"""Every one-shot pruning method by name, with what it can do: the one place the CLI, the search, the export and
the driver ask which method needs calibration, quantizes, can be searched or has an llm-compressor modifier.

Modelled on llm-compressor's modifier contract (which statistics a modifier needs, whether it updates weights).
Classes are named, not imported, so the CLI builds its parser without loading torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from prunesearch.safety import UserError

NEEDS = ("none", "inputs", "gradients")  # calibration a method needs; gradients come with input statistics
SELECTIONS = ("row", "layer", "column block")  # where an unstructured mask is chosen (N:M: always per group)
REALIZERS = ("ranks", "levels")  # how the search realizes a candidate in milliseconds


@dataclass(frozen=True)
class Method:
    """One pruning method and its declared capabilities.

    ``needs``: none (data-free), the input statistics of each layer from a calibration walk, or also the gradients
    of the dense model's loss. ``selection``: an unstructured mask keeps the same count in every output row, is
    chosen over the whole layer, or per column block of the layer (SparseGPT's adaptive mask selection).
    ``updates_weights``: the kept weights change (error compensation), so a mask alone does not reproduce it.
    ``quantizes``: it can also quantize the kept weights (``wbits``). ``realizer``: how the search realizes it:
    ``ranks`` (a threshold on weight ranks cached once: ``search.scores``), ``levels`` (a database of the pruned
    weights at every sparsity level: ``search.levels``, which builds it with SparseGPT's solver), None (it cannot be
    searched). ``modifier``: the llm-compressor modifier applying it, if any.
    """

    name: str
    path: str  # "module:Class"
    needs: str
    selection: str
    updates_weights: bool
    quantizes: bool = False
    realizer: str | None = None
    modifier: str | None = None

    def __post_init__(self):
        if self.needs not in NEEDS or self.selection not in SELECTIONS or self.realizer not in (*REALIZERS, None):
            raise ValueError(f"method {self.name}: undeclared capability value")

    @property
    def cls(self) -> type:
        """The pruner class (imported on first use)."""
        module, _, name = self.path.partition(":")
        return getattr(importlib.import_module(module), name)

    @property
    def searchable(self) -> bool:
        return self.realizer is not None


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("magnitude", "pruners.magnitude:Magnitude", "none", "layer", False, realizer="ranks"),
    Method("wanda", "pruners.wanda:Wanda", "inputs", "row", False, realizer="ranks",
           modifier="WandaPruningModifier"),
    Method("sparsegpt", "pruners.sparsegpt:SparseGPT", "inputs", "column block", True, quantizes=True,
           realizer="levels", modifier="SparseGPTModifier"),
    Method("gblm", "pruners.gblm:GBLM", "gradients", "row", False, realizer="ranks"),
    Method("sparsellm", "pruners.sparsellm:SparseLLM", "inputs", "column block", True),  # optimizes whole FFNs
)}


def get_method(name: str) -> Method:
    """The method called ``name``; an unknown name is a user error listing the known ones."""
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def names(**capabilities) -> list[str]:
    """Names of the methods whose capabilities equal the given ones (e.g. ``searchable=True``), in registry order."""
    return [m.name for m in METHODS.values() if all(getattr(m, k) == v for k, v in capabilities.items())]


def modifiers() -> dict[str, str]:
    """Method name -> llm-compressor modifier class name, for the methods that have one."""
    return {m.name: m.modifier for m in METHODS.values() if m.modifier}
