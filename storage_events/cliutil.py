"""Pieces every command line shares: config files, version, token, logging."""

from __future__ import annotations

import json
import logging
import time
import tomllib
from pathlib import Path
from typing import Any, TypeVar

import click
import msgspec

from storage_events import __version__

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
    "--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
    help="json: one JSON object per line (time, level, logger, message), for log collectors.",
)


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
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(verbose: int, log_format: str = "text") -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JSONFormatter() if log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.DEBUG if verbose > 0 else logging.INFO)
