"""What the three console commands (rlr-train, rlr-eval, rlr-score) share: one-line errors, exit status 2
(130 when the user stopped it with Ctrl-C)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, NoReturn, TypeVar

from rlr_cli.errors import Interrupted, UserError

T = TypeVar("T")


def fail(program: str, message: str) -> NoReturn:
    print(f"{program}: error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def guarded(program: str, body: Callable[[], T]) -> T:
    """body(), with a UserError (bad config, missing weights, bad input) as one line and exit status 2,
    Ctrl-C as one line and exit status 130."""
    try:
        return body()
    except UserError as error:
        fail(program, str(error))
    except Interrupted as stop:
        print(f"{program}: {stop}", file=sys.stderr, flush=True)
        sys.exit(130)
    except KeyboardInterrupt:
        print(f"{program}: interrupted", file=sys.stderr, flush=True)
        sys.exit(130)


def check_writable(folder: Path, key: str) -> None:
    """The run folder can be created under folder: its nearest existing ancestor is a writable folder."""
    import tempfile

    existing = folder.expanduser().absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{key}={folder}: {existing} is a file, not a folder; choose another {key}")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as error:
        raise UserError(f"{key}={folder}: cannot write in {existing} ({error.strerror}); choose another {key}") from None
