"""User-facing errors: one line, naming the field or file and what was expected."""

from __future__ import annotations


class DistillError(Exception):
    """An error caused by the user's input. The CLI prints `str(err)` on one line and exits non-zero."""

    exit_code = 2
    everywhere = False
    """True when every rank raises the same error at the same point (only rank 0 prints it)."""


class PeerFailed(DistillError):
    """Another rank failed first and reports its own error; this rank stops without printing."""

    exit_code = 1


class ConfigError(DistillError):
    """A run configuration (or DeepSpeed configuration) is invalid."""


class DataError(DistillError):
    """A dataset cannot be read or does not fit the run."""


class ModelError(DistillError):
    """A model or tokenizer cannot be loaded, or teacher and student are incompatible."""


def one_line(text: str) -> str:
    """Collapse whitespace so a message always prints on one line."""
    return " ".join(str(text).split())


def first_sentence(err: BaseException, limit: int = 200) -> str:
    """`Type: first sentence` of a library exception, for embedding in a one-line message."""
    text = one_line(str(err))
    cut = text.find(". ")
    if cut != -1:
        text = text[: cut + 1]
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{type(err).__name__}: {text}"
