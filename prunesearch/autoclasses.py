"""Make width-pruned exports (``model_type`` ``prunesearch_<base>``) loadable by transformers' Auto classes.

``import prunesearch`` calls ``install()``, which costs nothing: the config classes are registered with ``AutoConfig``
once transformers loads its config mapping, and the model classes with ``AutoModelForCausalLM`` once it loads its
model mapping (an import hook; both at once if transformers is already loaded). The model entry defers to the real
class, built by ``pruners.width.export`` on first use, because building it needs the base modeling module, which
may itself be importing when the mapping loads. Nothing runs remote code.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import sys
from typing import Any

from prunesearch.safety import UserError

EXPORT_TYPES = ("llama", "qwen2", "opt", "gpt2")
PREFIX = "prunesearch_"
_CONFIGS = "transformers.models.auto.configuration_auto"
_MODELS = "transformers.models.auto.modeling_auto"
_config_classes: dict[str, type] = {}


def config_class(base_type: str) -> type:
    """The config class of a width export of ``base_type``: the base config with model_type ``prunesearch_<base>``
    and per-layer ``layer_heads``, ``layer_kv_heads`` and ``layer_intermediate`` lists."""
    if base_type not in EXPORT_TYPES:
        raise UserError(f"width export knows {', '.join(EXPORT_TYPES)} models, not {base_type!r}; add it to "
                        "EXPORT_TYPES in prunesearch/autoclasses.py")
    if base_type not in _config_classes:
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        base = CONFIG_MAPPING[base_type]
        _config_classes[base_type] = type(f"Prunesearch{base.__name__}", (base,),
                                          {"model_type": PREFIX + base_type, "__module__": __name__})
    return _config_classes[base_type]


def _deferred_model(base_type: str) -> type:
    """The Auto mapping's entry for ``base_type`` exports: builds the real class on first load and hands over."""

    def real() -> type:
        from pruners.width.export import model_class

        return model_class(base_type)

    def from_pretrained(cls, *args: Any, **kwargs: Any):
        return real().from_pretrained(*args, **kwargs)

    def from_config(cls, config, **kwargs: Any):
        return real()._from_config(config, **kwargs)

    return type(f"PrunesearchDeferred{base_type.title()}", (), {
        "config_class": config_class(base_type), "__module__": __name__,
        "from_pretrained": classmethod(from_pretrained), "_from_config": classmethod(from_config)})


def _register_configs() -> None:
    from transformers.models.auto.configuration_auto import AutoConfig

    for t in EXPORT_TYPES:
        AutoConfig.register(PREFIX + t, config_class(t), exist_ok=True)


def _register_models() -> None:
    from transformers.models.auto.modeling_auto import AutoModelForCausalLM

    for t in EXPORT_TYPES:
        AutoModelForCausalLM.register(config_class(t), _deferred_model(t), exist_ok=True)


_ACTIONS = {_CONFIGS: _register_configs, _MODELS: _register_models}
_pending: list = []
_loading: list[str] = []
_running: list[bool] = []


def _run(action) -> None:
    """Queue ``action``; run the queue once no hooked module is importing and no action runs (building a config
    class imports modules that need the model mapping complete, and may load it, whose registration then waits)."""
    _pending.append(action)
    if _loading or _running:
        return
    _running.append(True)
    try:
        while _pending:
            _pending.pop(0)()
    except BaseException:
        _pending.clear()
        raise
    finally:
        _running.clear()


class _After(importlib.abc.Loader):
    """Runs the wrapped loader, then the registration that was waiting for the module."""

    def __init__(self, loader: importlib.abc.Loader, action) -> None:
        self.loader, self.action = loader, action

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module) -> None:
        _loading.append(module.__name__)
        try:
            self.loader.exec_module(module)
        finally:
            _loading.pop()
        _run(self.action)


class _Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path, target=None):
        if name not in _ACTIONS:
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _After(spec.loader, _ACTIONS[name])
        return spec


def install() -> None:
    """Register now what transformers has loaded already; hook the rest. Idempotent."""
    for name, action in _ACTIONS.items():
        if name in sys.modules:
            _run(action)
    if not any(isinstance(f, _Hook) for f in sys.meta_path) and not all(n in sys.modules for n in _ACTIONS):
        sys.meta_path.insert(0, _Hook())
