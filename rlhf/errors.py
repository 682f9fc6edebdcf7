"""Errors that are the user's to fix: bad data, a wrong path, a mistaken option.

The `rlhf` command prints a `UserError` as one line, `rlhf: error: <where>: <what>`, and exits with status 2;
every other exception is a bug and keeps its traceback (`--debug` or `RLHF_DEBUG=1` shows the traceback of a
`UserError` too). `where` names the place as the user counts it: a file and its 1-based line for JSON Lines, the
0-based row of the dataset as loaded (`ds[i]`, file order) otherwise, then the field.
"""

from __future__ import annotations

from pathlib import Path


class UserError(ValueError):
    """A mistake in the user's data, paths or options; `str()` is `"<where>: <message>"` (or the message alone)."""

    def __init__(self, message: str, *, where: str | None = None):
        self.message, self.where = message, where
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, where: str) -> UserError:
        """The same error at another place (e.g. the file's row instead of the row within a split)."""
        return type(self)(self.message, where=where)


class MissingPathError(UserError, FileNotFoundError):
    """A local file or directory named by the user does not exist."""


def looks_local(name: str) -> bool:
    """True when `name` can only be a local path: it starts with '/', '.' or '~', or has more parts than 'org/name'."""
    return name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") >= 2


def check_local_path(name: str, option: str | None = None, what: str = "model") -> None:
    """MissingPathError when `name` is meant as a local path (:func:`looks_local`) and does not exist; `option`
    (the config option that named it) prefixes the message."""
    if looks_local(name) and not Path(name).expanduser().exists():
        path = "path" if option else f"{what} path"
        raise MissingPathError(f"{path} {name!r} does not exist (a hub name looks like 'org/name')", where=option)
