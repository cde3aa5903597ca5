"""The one exception type the CLI turns into a one-line message and a non-zero exit."""
from __future__ import annotations


class AdvcamError(Exception):
    """An error caused by the user's input (files, params, checkpoints), with a message naming it."""
