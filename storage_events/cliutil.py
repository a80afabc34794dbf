"""Pieces every command line shares: config files, version, token, logging."""

from __future__ import annotations

import logging
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


def setup_logging(verbose: int) -> None:
    level = logging.DEBUG if verbose > 0 else logging.INFO
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
