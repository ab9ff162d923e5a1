"""What a recipe says when its inputs are wrong: one line naming the file or parameter, no traceback.

Every adapter's recipes raise :class:`RecipeError` (or ``FileNotFoundError`` / ``FileExistsError``) for a
problem the user can fix, and their ``train.py`` runs ``main`` through :func:`run_recipe`, which prints such an
error as ``error: <message>`` and exits 1; anything else is a bug in fqss or a toolkit and keeps its traceback.
"""
from __future__ import annotations

import sys
from collections.abc import Callable


class RecipeError(ValueError):
    """A problem with the recipe's inputs (paths, data, settings, checkpoints), stated for the user."""


USER_ERRORS = (RecipeError, FileNotFoundError, FileExistsError)


def first_line(error: BaseException) -> str:
    """``"<type>: <first non-empty line of the message>"``: a library's error, short enough for one line."""
    detail = next((line for line in str(error).splitlines() if line.strip()), "no detail")
    return f"{type(error).__name__}: {detail}"


def run_recipe(main: Callable[[], object]) -> int:
    """``main()``; a user error (:data:`USER_ERRORS`) is one line on stderr and exit status 1."""
    try:
        main()
    except USER_ERRORS as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0
