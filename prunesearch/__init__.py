"""prunesearch: decide where to prune a causal LM, then prune it for real.

Shared infrastructure lives here (data, evaluation, the built-in default model, the CLI); the pruners, the
search engine and the accuracy predictor are the top-level packages ``pruners``, ``search`` and ``predictors``.
"""

__version__ = "0.1.0"

from prunesearch.autoclasses import install as _install_autoclasses

_install_autoclasses()
