"""``storage-events``: follow a relay's feed from a terminal or a script."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from . import printable
from .client import FeedError, subscribe
from .cliutil import setup_logging, token_option, version_option
from .printable import text_line


@click.group()
@version_option
def main() -> None:
    """Subscribe to storage events."""


@main.command()
@click.argument("url")
@click.option("--path", "paths", multiple=True, help="Only events under this path prefix.")
@click.option("--site", "sites", multiple=True, help="Only events of this site.")
@click.option("--node", "nodes", multiple=True, help="Only events of this node.")
@click.option("--type", "types", multiple=True, help="Only these inotify flags, e.g. IN_CREATE.")
@click.option(
    "--since",
    help="Start after this event id, or 'earliest', or 'now' (default), or 'snapshot': "
    "first every entry that exists (as 'state' lines), then the events after them.",
)
@click.option("--count", type=click.IntRange(min=1), help="Exit after N events.")
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["json", "text"]),
    default="text",
    show_default=True,
    help="json: one event object per line.",
)
@token_option
@click.option("-v", "--verbose", count=True, help="Log reconnections.")
@version_option
def tail(
    url: str,
    paths: tuple[str, ...],
    sites: tuple[str, ...],
    nodes: tuple[str, ...],
    types: tuple[str, ...],
    since: str | None,
    count: int | None,
    fmt: str,
    token: str | None,
    verbose: int,
) -> None:
    """Print the events of the relay at URL (http://host:port) as they happen."""
    if verbose:
        setup_logging(verbose - 1)
    seen = 0
    out = sys.stdout
    try:
        for item in subscribe(
            url, paths=paths, sites=sites, nodes=nodes, types=types, since=since, token=token
        ):
            # JSON escapes keep a JSON line the same value, and a hostile relay's raw control
            # characters off the terminal.
            out.write(
                (printable.escape_json(item.data) if fmt == "json" else text_line(item)) + "\n"
            )
            out.flush()
            seen += 1
            if count is not None and seen >= count:
                return
    except FeedError as e:
        raise click.ClickException(printable.escape(str(e))) from None  # the relay's words
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)


@main.command(name="exec", context_settings={"ignore_unknown_options": True})
@click.argument("url")
@click.option("--path", "paths", multiple=True, help="Only events under this path prefix.")
@click.option("--site", "sites", multiple=True, help="Only events of this site.")
@click.option(
    "--type", "types", multiple=True, help="Only these inotify flags (IN_CLOSE_WRITE, …)."
)
@click.option(
    "--state",
    "state_dir",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory for the checkpoint and the dead letter (one per feed and command).",
)
@click.option("--jobs", type=click.IntRange(min=1, max=1024), default=1, show_default=True)
@click.option(
    "--retries",
    type=click.IntRange(min=0, max=100),
    default=3,
    show_default=True,
    help="Runs of a failing command after the first, with a growing pause, before its event "
    "goes to the dead letter.",
)
@click.option(
    "--since",
    help="Where a new state directory starts: an event id, 'earliest' or 'now' (default); "
    "afterwards, its checkpoint.",
)
@click.option("--group", help="Share the feed's events with other runners (not available yet).")
@token_option
@click.option("-v", "--verbose", count=True, help="More log output.")
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
@version_option
def exec_(
    url: str,
    paths: tuple[str, ...],
    sites: tuple[str, ...],
    types: tuple[str, ...],
    state_dir: Path,
    jobs: int,
    retries: int,
    since: str | None,
    group: str | None,
    token: str | None,
    verbose: int,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND for every event of the relay at URL, at least once: storage-events exec URL
    --state DIR [--jobs N] -- convert {path} {path}.png. Placeholders: {path} {old_path} {site}
    {node} {flags} {id} {size}. No shell: a file name is one argument, whatever it holds."""
    from .execute import ExecError, Runner, State, run

    setup_logging(verbose)
    if group is not None:
        raise click.UsageError(
            "--group: consumer groups are not available in this version; run one runner per "
            "feed (or split the feed with --path/--site between runners)"
        )
    try:
        run(
            Runner(
                url,
                list(command),
                State(state_dir),
                jobs=jobs,
                retries=retries,
                paths=paths,
                sites=sites,
                types=types,
                since=since,
                token=token,
            )
        )
    except ExecError as e:
        raise click.ClickException(printable.escape(str(e))) from None


@main.command()
@click.argument("folder", default="storage-events-demo", type=click.Path(file_okay=False))
@click.option("--port", type=int, default=0, help="Relay port (default: a free one).")
def demo(folder: str, port: int) -> None:
    """Run a relay, an agent watching FOLDER and a live tail, all on this machine."""
    from .demo import run_demo

    run_demo(folder, port)
