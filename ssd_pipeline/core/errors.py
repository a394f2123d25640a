"""The one exception type the user sees: a sentence saying what was wrong and what to do."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment, reported as one line and a non-zero exit (no traceback).

    Raise it where the cause is known; the CLI prints ``error: <message>`` and exits with
    ``exit_code``. Anything else is a bug in the suite and keeps its traceback.
    """

    exit_code = 2

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message
