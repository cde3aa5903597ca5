"""Small leaf utilities any module may use: errors, atomic file I/O, checkpoints, progress, devices."""
from __future__ import annotations

from typing import Any, Mapping


def param(section: Any, key: str, default: Any) -> Any:
    """``section[key]`` of a params section given as a ``Config``, a dict, any object with attributes, or None;
    ``default`` where the section or the key is missing (library calls without a validated config)."""
    if section is None:
        return default
    if isinstance(section, Mapping):
        return section.get(key, default)
    return getattr(section, key, default)
