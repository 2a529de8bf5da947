"""JSON-ready values for the summaries and status records the package writes."""

from __future__ import annotations

import os
from collections.abc import Mapping

__all__ = ["json_default", "jsonable"]


def jsonable(value):
    """The JSON-ready form of numpy arrays and scalars (lists, Python numbers), paths
    (strings) and mappings (dicts); any other value unchanged."""
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):
        return value.tolist()  # numpy scalars give Python numbers
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, Mapping) and not isinstance(value, dict):
        return dict(value)
    return value


def json_default(value):
    """``default=`` for :func:`json.dumps`: :func:`jsonable`, or ``TypeError``."""
    converted = jsonable(value)
    if converted is value:
        raise TypeError(f"not JSON-serialisable: {value!r}")
    return converted
