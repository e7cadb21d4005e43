"""Where prunesearch keeps what it builds once and reuses (default model, token ids, dense logits)."""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs


def cache_dir(*parts: str) -> Path:
    """Return (and create) a folder under the prunesearch cache; ``PRUNESEARCH_CACHE`` overrides the location."""
    root = Path(os.environ.get("PRUNESEARCH_CACHE") or platformdirs.user_cache_dir("prunesearch"))
    path = root.joinpath(*parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
