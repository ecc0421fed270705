"""One exception type for every user-facing failure.

The CLI prints ``error: <message>`` on one line and exits nonzero, so every
message must name the problem (file, tensor, parameter) without a traceback.
"""


class MergePipeError(Exception):
    """A failure caused by the user's input or environment, reported in one line."""

    exit_code = 1

    def __str__(self) -> str:  # keep CLI output to one line
        return " ".join(super().__str__().split())


class CatalogLockedError(MergePipeError):
    """The catalog file is held read-write by another process."""

    exit_code = 3


class StaleModelError(MergePipeError):
    """A registered model's files changed after registration."""


class BadCheckpointError(MergePipeError):
    """A safetensors file or model directory is corrupt or inconsistent."""


class SpecError(MergePipeError):
    """A merge spec names an unknown method, parameter or model, or has bad values."""


class BudgetError(MergePipeError):
    """An I/O budget cannot be met by any plan."""
