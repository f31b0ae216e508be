"""The one exception family lmkernel raises for bad input: each message names the file and what was expected."""

from __future__ import annotations


class LmkError(Exception):
    """Base class for every error lmkernel reports to its user."""


class ModelSourceError(LmkError):
    """A model name or path that does not resolve to something lmkernel can load."""


class UnsupportedModelError(LmkError):
    """A model whose architecture, tensor type or layout lmkernel does not support."""


class WeightsError(LmkError):
    """A weights file that is missing, truncated or inconsistent with its config."""


class AdapterError(LmkError):
    """A LoRA adapter (PEFT format) that is missing, malformed or does not fit its base model."""


class ContextLengthError(LmkError, ValueError):
    """A request longer than the model or the engine can hold (servers answer it with context_length_exceeded)."""
