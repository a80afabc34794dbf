"""Pieces every command line shares: config files, version, token, logging."""

from __future__ import annotations

import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import unquote_plus

import click
import msgspec

from storage_events import __version__, printable

T = TypeVar("T")

TOKEN_ENV = "STORAGE_EVENTS_TOKEN"

version_option = click.version_option(__version__)

token_option = click.option(
    "--token",
    envvar=TOKEN_ENV,
    help=f"Bearer token (or set {TOKEN_ENV}).",
)


def load_config(path: Path | None, kind: type[T], overrides: dict[str, Any]) -> T:
    """Read a TOML file (if given), let command-line values that were set win, and check the
    result against ``kind``. Errors name the file and the offending key."""
    data: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        where = str(path)
        try:
            data = tomllib.loads(path.read_text())
        except OSError as e:
            raise click.ClickException(f"cannot read config {path}: {e.strerror}") from None
        except tomllib.TOMLDecodeError as e:
            raise click.ClickException(f"config {path} is not valid TOML: {e}") from None
    data.update({k: v for k, v in overrides.items() if v not in (None, ())})
    try:
        return msgspec.convert(data, kind, str_keys=True)
    except msgspec.ValidationError as e:
        raise click.ClickException(f"config {where}: {e}") from None


log_format_option = click.option(
    "--log-format",
    type=click.Choice(["text", "json"]),
    default="text",
    show_default=True,
    help="json: one JSON object per line (time, level, logger, message), for log collectors.",
)


class TextFormatter(logging.Formatter):
    """One line per record whatever the message holds: its arguments are often names a peer
    chose (streams, ``via``, sites, paths, request paths), and a newline in one would forge a
    whole log line. The traceback appended after it is ours and stays as it is."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s: %(message)s")

    def formatMessage(self, record: logging.LogRecord) -> str:
        # The format's other fields (time, level, logger name) are ours and printable.
        return printable.escape(super().formatMessage(record))


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        # json.dumps escapes only C0 controls: NEL, U+2028 and the like would still end the
        # line for some readers, and C1 controls reach the terminal of whoever tails the file.
        return printable.escape_json(json.dumps(entry, ensure_ascii=False))


SECRET_PARAMETERS = frozenset({"access_token", "token"})


def redact_query(target: str) -> str:
    """A request target (path?query) with the value of each token parameter replaced by
    REDACTED. Names are compared as the relay reads them, percent-decoded: ``access%5Ftoken``
    is ``access_token`` too."""
    path, mark, query = target.partition("?")
    if not mark:
        return target
    pairs = []
    for pair in query.split("&"):
        name, eq, _ = pair.partition("=")
        pairs.append(f"{name}=REDACTED" if eq and unquote_plus(name) in SECRET_PARAMETERS else pair)
    return f"{path}?{'&'.join(pairs)}"


class RedactTokens(logging.Filter):
    """uvicorn logs each request with its query (``uvicorn.access``: client, method, target,
    HTTP version, status; WebSocket handshakes on ``uvicorn.error``), and the relay's web page
    passes the reader's token as ``?access_token=`` because a browser's EventSource cannot set
    a header. A token in a log file is a token anyone who reads the logs can use."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("uvicorn") and isinstance(record.args, tuple):
            record.args = tuple(redact_query(a) if isinstance(a, str) else a for a in record.args)
        return True


def setup_logging(verbose: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())
    # On the handler, not on uvicorn's loggers: their records reach it by propagation.
    handler.addFilter(RedactTokens())
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose > 0 else logging.INFO)
