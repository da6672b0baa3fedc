"""`sealstream dlq ...`: list, show and replay dead letters (sealstream.dead_letters). Registered
on the main CLI in cli.py. Prints metadata only: never a letter's value, nor another header's
value."""

from __future__ import annotations

import getpass
import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from sealstream.adapters.kafka import DeadLetterReader, Publisher
    from sealstream.adapters.postgres import DeadLetterReplays
    from sealstream.dead_letters import DeadLetterInfo, LetterFilter
    from sealstream.settings import Settings

dlq_app = typer.Typer(
    help="Dead letters: records the workers refused (metadata only), and their replay.",
    no_args_is_help=True,
)
console = Console()

Reason = Annotated[
    str | None, typer.Option(help="reason contains this (case-insensitive), e.g. 'unknown chat'")
]
Stage = Annotated[str | None, typer.Option(help="refused by this stage: encryptor | indexer")]
Since = Annotated[
    str | None, typer.Option(help="dead-lettered at or after: ISO time, or ago (15m, 2h, 7d)")
]
Until = Annotated[
    str | None, typer.Option(help="dead-lettered before: ISO time, or ago (15m, 2h, 7d)")
]
Origin = Annotated[str | None, typer.Option("--topic", help="read from this topic (dlq.topic)")]
Chat = Annotated[str | None, typer.Option(help="this chat's letters only (the record key)")]


@contextmanager
def _tools() -> Iterator[tuple[Settings, DeadLetterReader, Publisher, DeadLetterReplays]]:
    from sealstream.adapters.postgres import Database
    from sealstream.errors import StoreUnavailable
    from sealstream.settings import Settings
    from sealstream.wiring import dead_letter_tools

    settings = Settings()
    database = Database(settings.postgres)
    try:
        database.open()
        with dead_letter_tools(settings, database) as (reader, publisher, ledger):
            yield settings, reader, publisher, ledger
    except StoreUnavailable as err:
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(1) from None
    finally:
        database.close()


def _filter(
    reason: str | None,
    stage: str | None,
    since: str | None,
    until: str | None,
    topic: str | None,
    chat: str | None,
) -> LetterFilter:
    """The options as a filter; a bad one ends the command (exit 2) naming it and why."""
    from sealstream.dead_letters import operator_filter

    try:
        return operator_filter(
            reason=reason, stage=stage, since=since, until=until, topic=topic, chat=chat
        )
    except ValueError as err:
        console.print(Text(str(err), style="red"))
        raise typer.Exit(2) from None


def _value_cell(info: DeadLetterInfo) -> str:
    if info.value_omitted is not None or info.value_bytes is None:
        return "omitted"
    return f"{info.value_bytes} B"


def _origin(info: DeadLetterInfo) -> str:
    return f"{info.origin_topic}/{info.origin_partition}:{info.origin_offset}"


@dlq_app.command("list")
def dlq_list(
    reason: Reason = None,
    stage: Stage = None,
    since: Since = None,
    until: Until = None,
    topic: Origin = None,
    chat: Chat = None,
    limit: Annotated[
        int, typer.Option(min=1, max=1000, help="letters at most (oldest first)")
    ] = 100,
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the admin API answers")] = False,
) -> None:
    """List dead letters: where, when, which stage, why, from where. Never a value."""
    from sealstream.dead_letters import as_json as letter_json
    from sealstream.dead_letters import list_letters

    where = _filter(reason, stage, since, until, topic, chat)
    with _tools() as (_, reader, _publisher, ledger):
        page = list_letters(reader, where, limit)
        replayed = ledger.replayed(reader.topic, [i.coordinates for i in page.letters])
    if as_json:
        body = {
            "dead_letters": [letter_json(i, replayed.get(i.coordinates)) for i in page.letters],
            "truncated": page.truncated,
        }
        typer.echo(json.dumps(body))
        return
    table = Table("dlq", "at (UTC)", "stage", "reason", "origin", "chat", "value", "replayed")
    for info in page.letters:
        again = replayed.get(info.coordinates)
        table.add_row(
            f"{info.partition}:{info.offset}",
            info.at.strftime("%Y-%m-%d %H:%M:%S"),
            Text(info.stage),
            Text(info.reason),
            Text(_origin(info)),
            info.chat_id or "-",
            _value_cell(info),
            f"{again.replays}x" if again else "-",
        )
    console.print(table)
    more = " (more match: narrow with --since/--reason or raise --limit)" if page.truncated else ""
    console.print(f"{len(page.letters)} dead letters{more}")


@dlq_app.command("show")
def dlq_show(
    coordinates: Annotated[str, typer.Argument(help="the letter's partition:offset (see list)")],
    as_json: Annotated[bool, typer.Option("--json", help="JSON, as the admin API answers")] = False,
) -> None:
    """Show one dead letter's metadata (never its value)."""
    from sealstream.dead_letters import as_json as letter_json
    from sealstream.dead_letters import parse_coordinates, show

    try:
        partition, offset = parse_coordinates(coordinates)
    except ValueError as err:
        console.print(Text(str(err), style="red"))
        raise typer.Exit(2) from None
    with _tools() as (settings, reader, _publisher, ledger):
        info = show(reader, partition, offset)
        again = ledger.replayed(reader.topic, [(partition, offset)]).get((partition, offset))
        if info is None:
            console.print(f"[red]no dead letter at {partition}:{offset} of {reader.topic}[/red]")
            raise typer.Exit(1)
        why_not = info.unreplayable(settings.kafka.messages_topic)
    if as_json:
        typer.echo(json.dumps(letter_json(info, again)))
        return
    table = Table("field", "value", title=f"dead letter {partition}:{offset} of {reader.topic}")
    rows = [
        ("dead-lettered at", info.at.isoformat(timespec="seconds")),
        ("stage", info.stage),
        ("reason", info.reason),
        ("origin", _origin(info)),
        ("chat (record key)", info.chat_id or f"not a chat id ({info.key_bytes} bytes)"),
        (
            "value (never shown)",
            f"none ({info.value_omitted or 'no value'})"
            if info.value_bytes is None
            else f"{info.value_bytes} bytes",
        ),
        (
            "other headers (names)",
            (", ".join(info.headers) or "-")
            + (f" (of {info.header_count})" if info.header_count > len(info.headers) else ""),
        ),
        ("replayable", "yes" if why_not is None else f"no: {why_not}"),
        (
            "replayed",
            f"{again.replays}x, last by {again.last_replayed_by} at "
            f"{again.last_replayed_at.isoformat(timespec='seconds')} to partition "
            f"{again.replayed_partition} offset {again.replayed_offset}"
            if again
            else "never",
        ),
    ]
    for name, value in rows:
        table.add_row(name, Text(value))
    console.print(table)


@dlq_app.command("replay")
def dlq_replay(
    coordinates: Annotated[
        list[str] | None, typer.Argument(help="letters to replay, as partition:offset")
    ] = None,
    reason: Reason = None,
    stage: Stage = None,
    since: Since = None,
    until: Until = None,
    topic: Origin = None,
    chat: Chat = None,
    all_letters: Annotated[
        bool, typer.Option("--all", help="every letter (when no coordinates nor filter)")
    ] = False,
    dry_run: Annotated[bool, typer.Option(help="check and report, publish nothing")] = False,
    force: Annotated[bool, typer.Option(help="replay letters replayed before too")] = False,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
) -> None:
    """Replay dead letters into the message topic after a fix (skips letters replayed before)."""
    # Key, value and the record's own headers as they came, acks=all. A letter replayed before
    # is skipped unless --force; the pipeline stores a message id once, so even a forced replay
    # never makes a second message (docs/operations.md, "Dead letters").
    from rich.progress import Progress

    from sealstream.dead_letters import (
        ALREADY_REPLAYED,
        REFUSED,
        REPLAYED,
        parse_coordinates,
        replay,
        select,
    )

    filtered = any(v is not None for v in (reason, stage, since, until, topic, chat))
    if coordinates and (filtered or all_letters):
        # As the admin API: coordinates with --all would otherwise silently replay fewer.
        console.print("[red]give coordinates, or filters / --all, not both[/red]")
        raise typer.Exit(2)
    if not coordinates and not filtered and not all_letters:
        console.print("[red]give coordinates (partition:offset), a filter, or --all[/red]")
        raise typer.Exit(2)
    try:
        chosen = [parse_coordinates(c) for c in coordinates or []]
    except ValueError as err:
        console.print(Text(str(err), style="red"))
        raise typer.Exit(2) from None
    where = _filter(reason, stage, since, until, topic, chat)
    with _tools() as (settings, reader, publisher, ledger):
        if not coordinates:
            try:
                chosen = select(reader, where)
            except ValueError as err:
                console.print(Text(str(err), style="red"))
                raise typer.Exit(2) from None
        if not chosen:
            console.print("no dead letter matches")
            return
        action = "check" if dry_run else "replay"
        console.print(
            f"{action} {len(chosen)} dead letters of {reader.topic} into "
            f"{settings.kafka.messages_topic}{' (forced)' if force else ''}"
        )
        if not (yes or dry_run) and not typer.confirm("go on?", default=False):
            raise typer.Exit(1)
        with Progress(console=console) as bar:
            task = bar.add_task("replaying" if not dry_run else "checking", total=len(chosen))
            report = replay(
                reader,
                publisher,
                ledger,
                chosen,
                messages_topic=settings.kafka.messages_topic,
                actor=f"cli:{getpass.getuser()}",
                force=force,
                dry_run=dry_run,
                progress=lambda _: bar.advance(task),
            )
    table = Table("dlq", "outcome", "detail")
    for result in report.results:
        style = {REPLAYED: "green", REFUSED: "red", ALREADY_REPLAYED: "yellow"}.get(
            result.outcome, ""
        )
        table.add_row(
            f"{result.partition}:{result.offset}",
            Text(result.outcome, style=style),
            Text(result.detail),
        )
    console.print(table)
    console.print(", ".join(f"{n} {outcome}" for outcome, n in report.counts().items()))
    if report.count(REFUSED) or report.count("not_found") or report.count("being_replayed"):
        raise typer.Exit(1)
