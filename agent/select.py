"""Which names under a root the operator wants published: include/exclude globs. Pure."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Sequence


def _compile(patterns: Sequence[str]) -> re.Pattern[str] | None:
    if not patterns:
        return None
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns))


class Selector:
    """A pattern matches a name or the path relative to the root (``run1/raw/*.tmp``).

    Excluded names, files or directories, are not published and not watched: an excluded
    directory costs no inotify watch. ``include``, when given, selects the files to publish;
    directories are always traversed.
    """

    def __init__(self, include: Sequence[str] = (), exclude: Sequence[str] = ()) -> None:
        self._include = _compile(include)
        self._exclude = _compile(exclude)

    @property
    def active(self) -> bool:
        return self._include is not None or self._exclude is not None

    def excluded(self, parts: list[str], name: str, is_dir: bool) -> bool:
        rel = "/".join([*parts, name]) if parts else name
        ex = self._exclude
        if ex is not None and (ex.match(name) or ex.match(rel)):
            return True
        inc = self._include
        return not is_dir and inc is not None and not (inc.match(name) or inc.match(rel))
