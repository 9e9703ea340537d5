"""One exception family for everything lmap reports to its users.

Every message names the thing that is wrong (file, byte offset, key, tensor or
parameter) and what was expected, so the CLI can print it as one line.
"""

from __future__ import annotations


class LmapError(Exception):
    """Base class of every error lmap raises on purpose."""


class GGUFError(LmapError):
    """The file is not a valid GGUF container (names the field and byte offset)."""


class UnsupportedModelError(LmapError):
    """The GGUF is valid but holds an architecture, block type or tokenizer lmap cannot run."""


class ContextOverflowError(LmapError):
    """More tokens were asked for than the context holds."""


class InvalidParameterError(LmapError, ValueError):
    """A user-supplied parameter is out of range (names the parameter)."""


class ModelNotFoundError(LmapError, FileNotFoundError):
    """A model path does not exist and is not a known model name."""
