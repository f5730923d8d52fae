"""What the three console commands (rlr-train, rlr-eval, rlr-score) share: one-line errors, exit status 2."""
from __future__ import annotations

import sys
from typing import Callable, NoReturn, TypeVar

from rlr_cli.errors import UserError

T = TypeVar("T")


def fail(program: str, message: str) -> NoReturn:
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def guarded(program: str, body: Callable[[], T]) -> T:
    """body(), with a UserError (bad config, missing weights, bad input) as one line and exit status 2."""
    try:
        return body()
    except UserError as error:
        fail(program, str(error))
