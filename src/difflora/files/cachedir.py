"""Where difflora's caches live: one root the user can move with ``$DIFFLORA_CACHE``."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root"]


def cache_root() -> Path:
    """``$DIFFLORA_CACHE`` if set, else ``~/.cache/difflora``. Each kind of cache has a folder below
    it: ``features`` (eval's feature networks), ``latents`` (the latent and prompt caches)."""
    root = os.environ.get("DIFFLORA_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "difflora"
