"""What the `cdp-fast` subcommand modules share: the program name, the usage error (exit 2) and
the check of an output option (:func:`check_output`), made before any work."""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["PROG", "UsageError", "check_output"]

PROG = "cdp-fast"


class UsageError(Exception):
    """A bad command-line argument (exit status 2)."""


def check_output(flag, value, folder=False):
    """An output option (``flag`` without dashes, e.g. "out", "json"), checked before any work:
    a bad output option must not cost the run (a whole training run, a sampling run). ``value``
    None means the option was not given. A file path must not be a directory (``folder``: an
    output folder must not be a file), and its parent folder must exist and be writable
    (nothing is created for it: a typo in a folder name is refused, not made). ValueError, one
    line naming the option and the path, otherwise."""
    if value is None:
        return
    if not str(value).strip():
        raise ValueError(f"{flag}: an empty path")
    p = Path(value)
    if folder and p.exists() and not p.is_dir():
        raise ValueError(f"{flag}: cannot write into {value}: it is a file, not a folder")
    if not folder and p.is_dir():
        raise ValueError(f"{flag}: cannot write {value}: it is a directory; give a file path")
    parent = (p if folder and p.is_dir() else p.resolve().parent)
    if not parent.is_dir():
        why = "is not a folder" if parent.exists() else "does not exist"
        raise ValueError(f"{flag}: cannot write {value}: the folder {parent} {why}")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ValueError(f"{flag}: cannot write {value}: the folder {parent} is not writable")
