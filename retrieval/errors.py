"""The one error type a user can fix: bad input, a refused setting, a mismatched artefact."""
from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix (bad argument, damaged or mismatched file); the CLI prints it in one line.

    It subclasses ``ValueError`` so callers that validate input can keep catching that.
    """
