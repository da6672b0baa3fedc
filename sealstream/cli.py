"""The `sealstream` command line: stack control, migrations, services, demo, benchmarks, and the
operators' key, search and dead-letter commands."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich.console import Console
from rich.table import Table

from sealstream.settings import StackSettings

if TYPE_CHECKING:
    from sealstream.settings import Settings
from sealstream.stack import runner
from sealstream.stack.base import StackContext, StackError
from sealstream.wiring import key_service, message_stores

REPO_ROOT = Path(__file__).resolve().parents[1]

app = typer.Typer(help="Sealstream: server-side encrypted chat pipeline.", no_args_is_help=True)
stack_app = typer.Typer(help="The local stack of seven real servers.", no_args_is_help=True)
app.add_typer(stack_app, name="stack")
console = Console()

Only = Annotated[
    list[str] | None, typer.Option("--only", help="Limit to these servers (repeatable).")
]


def _stack_context() -> StackContext:
    return StackContext(settings=StackSettings(), repo_root=REPO_ROOT)


@stack_app.command("up")
def stack_up(only: Only = None) -> None:
    """Install what is missing and start every server; returns when all answer."""
    started = time.monotonic()
    try:
        servers = runner.build(_stack_context(), only)
        runner.up(servers, report=console.print)
    except StackError as err:
        console.print(f"[red]stack up failed:[/red] {err}")
        raise typer.Exit(1) from None
    console.print(f"stack up: all answering after {time.monotonic() - started:.1f}s")


@stack_app.command("down")
def stack_down(only: Only = None) -> None:
    """Stop exactly the processes `stack up` started (by recorded pid)."""
    runner.down(runner.build(_stack_context(), only), report=console.print)


@stack_app.command("status")
def stack_status(only: Only = None) -> None:
    """Show each server, its port, its pid and whether it answers a real request."""
    rows = runner.status(runner.build(_stack_context(), only))
    table = Table("server", "port", "pid", "RSS MiB", "answers", "detail")
    for row in rows:
        table.add_row(
            row.name,
            str(row.port),
            str(row.pid or "-"),
            f"{row.rss_mb:.0f}",
            "[green]yes[/green]" if row.answering else "[red]no[/red]",
            row.detail,
        )
    console.print(table)
    console.print(f"total resident memory: {sum(r.rss_mb for r in rows):.0f} MiB")
    if not all(row.answering for row in rows):
        raise typer.Exit(1)


SERVICES = ("ingest", "encryptor", "indexer", "reader", "admin", "delivery")
keys_app = typer.Typer(
    help="Key lifecycle: rotation, deletion (crypto-shredding), audit.", no_args_is_help=True
)
app.add_typer(keys_app, name="keys")

ChatArg = Annotated[str, typer.Argument(help="chat id (UUID)")]


def _chat_id(raw: str) -> uuid.UUID:
    try:
        return uuid.UUID(raw)
    except ValueError:
        console.print(f"[red]not a chat id (UUID): {raw!r}[/red]")
        raise typer.Exit(2) from None


@keys_app.command("add-tenant")
def keys_add_tenant(
    tenant: Annotated[str, typer.Argument(help="tenant id")],
    kms_key: Annotated[str, typer.Option("--kms-key", help="its Transit master key (CMK)")],
    region: Annotated[
        str | None,
        typer.Option(help="KMS region (a key of SEALSTREAM_VAULT__CLUSTERS); default KMS if unset"),
    ] = None,
) -> None:
    """Register a tenant and create its master key on its own KMS (idempotent)."""
    from sealstream.errors import KmsError
    from sealstream.settings import Settings

    with key_service(Settings(), actor="cli") as keys:
        try:
            keys.register_tenant(tenant, kms_key, region)
        except KmsError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    console.print(f"tenant {tenant}: master key {kms_key} on the {region or 'default'} KMS")


@keys_app.command("rotate")
def keys_rotate(
    chat: ChatArg,
    reason: Annotated[str, typer.Option(help="why (recorded in the audit trail)")] = "operator",
) -> None:
    """Give a chat a new DEK version; old versions stay readable."""
    from sealstream.settings import Settings

    with key_service(Settings(), actor="cli") as keys:
        console.print(f"chat {chat}: active DEK version {keys.rotate(_chat_id(chat), reason)}")


@keys_app.command("delete-chat")
def keys_delete_chat(
    chat: ChatArg,
    reason: Annotated[str, typer.Option(help="why (recorded in the audit trail)")],
) -> None:
    """Crypto-shred a chat: destroy its DEKs everywhere, then delete its index docs, rows and
    attachments (rows, objects, unfinished uploads)."""
    from sealstream.adapters.kafka import ConsumerGroupsProgress
    from sealstream.adapters.object_store import ObjectStore
    from sealstream.lifecycle import delete_chat
    from sealstream.settings import Settings

    settings = Settings()
    with (
        message_stores(settings) as (store, index),
        key_service(settings, actor="cli") as keys,
        closing(ObjectStore(settings.object_store)) as objects,
    ):
        workers = ConsumerGroupsProgress(settings.kafka)
        receipt = delete_chat(
            keys,
            index,
            store,
            _chat_id(chat),
            reason,
            workers,
            settings.deletion.sweep_seconds,
            objects,
        )
    table = Table("receipt", "value", title=f"chat {chat} deleted")
    table.add_row("DEK versions destroyed", str(receipt.dek_versions_destroyed))
    table.add_row("index documents deleted", str(receipt.index_documents_deleted))
    table.add_row("rows deleted", str(receipt.rows_deleted))
    table.add_row("attachment rows deleted", str(receipt.attachment_rows_deleted))
    table.add_row("attachment objects deleted", str(receipt.attachment_objects_deleted))
    table.add_row("unfinished uploads aborted", str(receipt.incomplete_uploads_aborted))
    table.add_row("sweep after the workers completed", str(receipt.sweep_completed))
    table.add_row("seconds", f"{receipt.seconds:.2f}")
    console.print(table)


@keys_app.command("rotate-due")
def keys_rotate_due(
    older_than_days: Annotated[
        float | None,
        typer.Option(
            help="rotate chats whose DEK is older than this (0 = every chat); "
            "default: the policy's rotate_max_age_days"
        ),
    ] = None,
    max_messages: Annotated[
        int | None,
        typer.Option(
            help="also rotate DEK versions that sealed this many messages; "
            "default: the policy's rotate_max_messages"
        ),
    ] = None,
    rate: Annotated[float, typer.Option(help="rotations per second at most")] = 50.0,
    cutoff: Annotated[
        str | None, typer.Option(help="resume a run: the cutoff (ISO time) it printed")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant's chats")] = None,
) -> None:
    """Batch rotation by policy (age, messages per version): rate-limited and resumable."""
    from datetime import datetime

    from rich.progress import Progress

    from sealstream.lifecycle import policy_cutoff, rotate_due
    from sealstream.settings import Settings

    settings = Settings()
    days = older_than_days if older_than_days is not None else settings.keys.rotate_max_age_days
    limit = max_messages if max_messages is not None else settings.keys.rotate_max_messages
    when = datetime.fromisoformat(cutoff) if cutoff else policy_cutoff(days)
    console.print(f"cutoff {when.isoformat()} (pass --cutoff with it to resume)")
    with key_service(settings, actor="cli") as keys, Progress(console=console) as bar:
        task = bar.add_task("rotating", total=None)
        report = rotate_due(
            keys,
            when,
            rate,
            reason=f"policy: older than {when.isoformat()} or {limit} messages sealed",
            progress=lambda n: bar.update(task, completed=n, description=f"rotated {n}"),
            tenant_id=tenant,
            max_messages=limit,
        )
    console.print(f"rotated {report.rotated} chats in {report.seconds:.1f}s")


@keys_app.command("reencrypt")
def keys_reencrypt(
    chat: ChatArg,
    retire: Annotated[
        bool, typer.Option(help="then destroy old DEK versions no message uses any more")
    ] = True,
) -> None:
    """Re-encrypt a chat's history to its newest DEK version and envelope format v2 (resumable,
    idempotent)."""
    from rich.progress import Progress

    from sealstream.lifecycle import reencrypt_chat
    from sealstream.settings import Settings

    settings = Settings()
    with (
        message_stores(settings) as (store, _),
        key_service(settings, actor="cli") as keys,
        Progress(console=console) as bar,
    ):
        task = bar.add_task("re-encrypting", total=None)
        report = reencrypt_chat(
            keys,
            store,
            _chat_id(chat),
            retire=retire,
            progress=lambda examined, done: bar.update(
                task, completed=examined, description=f"re-sealed {done}"
            ),
        )
    console.print(
        f"{report.rows_reencrypted} of {report.rows_examined} rows re-sealed with DEK version "
        f"{report.dek_version} in {report.seconds:.1f}s; versions destroyed: "
        f"{report.dek_versions_destroyed or 'none (still in use, or retired too recently)'}"
    )
    if report.dek_versions_kept_for_attachments:
        console.print(
            f"versions {report.dek_versions_kept_for_attachments} kept: live attachments are "
            "encrypted under them"
        )


@keys_app.command("rotate-master")
def keys_rotate_master(
    tenant: Annotated[
        str, typer.Option(help="tenant whose master key (CMK) to rotate")
    ] = "default",
    retire_old: Annotated[
        bool, typer.Option(help="after rewrapping, stop old CMK versions from decrypting")
    ] = False,
) -> None:
    """Rotate a tenant's master key on its own KMS and rewrap every stored DEK to the new
    version (resumable: run it again to finish an interrupted rewrap)."""
    from rich.progress import Progress

    from sealstream.errors import KeyNotFound
    from sealstream.lifecycle import rotate_master_key
    from sealstream.settings import Settings

    with key_service(Settings(), actor="cli") as keys, Progress(console=console) as bar:
        task = bar.add_task("rewrapping DEKs", total=None)
        try:
            report = rotate_master_key(
                keys,
                tenant,
                retire_old,
                progress=lambda examined, done: bar.update(
                    task, completed=examined, description=f"rewrapped {done}"
                ),
            )
        except KeyNotFound as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    rate = report.rewrapped / report.seconds if report.seconds else 0.0
    console.print(
        f"master key {report.kms_key_name}: now version {report.master_key_version}; "
        f"examined {report.examined}, rewrapped {report.rewrapped} in {report.seconds:.1f}s "
        f"({rate:,.0f}/s)"
    )
    if retire_old:
        console.print(
            f"versions below {report.master_key_version} of {report.kms_key_name} "
            "can no longer decrypt"
        )


@keys_app.command("delete-message")
def keys_delete_message(chat: ChatArg, message_id: Annotated[int, typer.Argument()]) -> None:
    """Hide one message at once, drop its ciphertext, its search document and its attachments."""
    from sealstream.adapters.object_store import ObjectStore
    from sealstream.lifecycle import delete_message
    from sealstream.settings import Settings

    settings = Settings()
    with (
        message_stores(settings) as (store, index),
        closing(ObjectStore(settings.object_store)) as objects,
    ):
        done = delete_message(store, index, _chat_id(chat), message_id, objects=objects)
    files = (
        f"{done.attachments_deleted} attachments marked deleted, "
        f"{done.attachment_objects_deleted} objects deleted"
    )
    if done.found:
        console.print(f"deleted; {files}")
    else:
        console.print(f"no such message (index entry removed if any; {files})")


@keys_app.command("retention")
def keys_retention(
    days: Annotated[
        int | None, typer.Option(help="set this retention (days) before applying")
    ] = None,
    tenant: Annotated[str | None, typer.Option(help="tenant to set it on")] = None,
    chat: Annotated[
        str | None, typer.Option(help="chat to set it on (overrides the tenant)")
    ] = None,
) -> None:
    """Apply retention: remove expired messages and attachments, destroy DEK versions none uses."""
    from rich.progress import Progress

    from sealstream.adapters.object_store import ObjectStore
    from sealstream.lifecycle import apply_retention
    from sealstream.settings import Settings

    settings = Settings()
    with (
        message_stores(settings) as (store, index),
        key_service(settings, actor="cli") as keys,
        closing(ObjectStore(settings.object_store)) as objects,
    ):
        if days is not None:
            if not (tenant or chat):
                console.print("[red]--days needs --tenant or --chat[/red]")
                raise typer.Exit(2)
            keys.set_retention(days, tenant, _chat_id(chat) if chat else None)
        with Progress(console=console) as bar:
            task = bar.add_task("applying retention", total=None)
            report = apply_retention(
                keys,
                index,
                store,
                progress=lambda n: bar.update(task, completed=n, description=f"chats {n}"),
                objects=objects,
            )
        topic_keys = _destroy_topic_keys(settings)
    console.print(
        f"{report.chats} chats with retention: {report.rows_deleted} rows, "
        f"{report.index_documents_deleted} index documents, "
        f"{report.attachment_rows_deleted} attachments, "
        f"{report.attachment_objects_deleted} attachment objects removed, "
        f"{report.dek_versions_destroyed} DEK versions destroyed ({report.seconds:.1f}s); "
        f"{len(topic_keys)} topic keys destroyed"
    )


def _destroy_topic_keys(settings: Settings) -> list[str]:
    from sealstream.adapters.postgres import Database, TopicKeyRepository
    from sealstream.keys.topic_keys import destroy_topic_keys

    db = Database(settings.postgres)
    db.open()
    try:
        return destroy_topic_keys(TopicKeyRepository(db), settings.kafka, actor="cli")
    finally:
        db.close()


@keys_app.command("destroy-topic-keys")
def keys_destroy_topic_keys() -> None:
    """Destroy the message topic's keys past its retention + segment roll (crypto-shredding
    what Kafka and its backups still hold of them); also run by `keys retention`."""
    from sealstream.settings import Settings

    destroyed = _destroy_topic_keys(Settings())
    console.print(f"{len(destroyed)} topic keys destroyed")


@keys_app.command("audit")
def keys_audit(
    chat: Annotated[str | None, typer.Option(help="only this chat")] = None,
    limit: Annotated[int, typer.Option(help="newest N entries")] = 50,
) -> None:
    """Show the append-only audit trail of key operations (no key material in it)."""
    from sealstream.adapters.postgres import ChatKeyRepository, Database
    from sealstream.settings import Settings

    db = Database(Settings().postgres)
    db.open()
    try:
        entries = ChatKeyRepository(db).audit_entries(_chat_id(chat) if chat else None, limit)
    finally:
        db.close()
    table = Table("at", "actor", "action", "chat", "version", "reason")
    for e in entries:
        table.add_row(
            e.at.isoformat(timespec="seconds"),
            e.actor,
            e.action,
            str(e.chat_id or "-"),
            str(e.dek_version or "-"),
            e.reason,
        )
    console.print(table)


@app.command("migrate")
def migrate() -> None:
    """Apply Postgres, Cassandra, OpenSearch, Kafka and Transit schemas and create the
    attachments bucket (idempotent)."""
    from sealstream.migrate import migrate_all
    from sealstream.settings import Settings

    for part, result in migrate_all(Settings()).items():
        console.print(f"{part:<11} {result}")


@app.command("run")
def run(
    service: Annotated[
        str, typer.Argument(help="ingest | encryptor | indexer | reader | admin | delivery | all")
    ],
    max_restarts: Annotated[
        int,
        typer.Option(help="all: restarts of one service within --restart-window before giving up"),
    ] = 5,
    restart_window: Annotated[float, typer.Option(help="all: seconds (see --max-restarts)")] = 60.0,
    grace: Annotated[
        float, typer.Option(help="all: seconds between SIGTERM and SIGKILL when stopping")
    ] = 30.0,
) -> None:
    """Run one service in the foreground (or all six as supervised child processes)."""
    from sealstream.services import RestartPolicy, run_all, run_service, service_settings
    from sealstream.settings import Settings

    if service == "all":
        policy = RestartPolicy(
            max_restarts=max_restarts, window_seconds=restart_window, grace_seconds=grace
        )
        raise typer.Exit(run_all(policy))
    if service not in SERVICES:
        console.print(
            f"[red]unknown service {service!r}[/red]; choose one of {', '.join(SERVICES)}, all"
        )
        raise typer.Exit(2)
    try:
        settings = service_settings(service, Settings())
    except ValueError as err:  # a principal the service must not run as: before it starts
        console.print(f"[red]{err}[/red]")
        raise typer.Exit(2) from None
    run_service(service, settings)


@app.command("token")
def token(
    user: Annotated[str, typer.Argument(help="user id to put in `sub`")],
    ttl: Annotated[int, typer.Option(help="lifetime in seconds")] = 3600,
    admin: Annotated[
        bool, typer.Option(help="grant the admin role (key-lifecycle admin API)")
    ] = False,
    tenant: Annotated[
        str | None, typer.Option(help="the user's tenant (chats are created in it)")
    ] = None,
) -> None:
    """Mint a bearer token for local use (signed with the configured auth secret)."""
    from sealstream.auth import ADMIN_ROLE, mint_token
    from sealstream.settings import Settings

    roles = (ADMIN_ROLE,) if admin else ()
    print(mint_token(Settings().auth, user, ttl, roles=roles, tenant=tenant))


@app.command("demo")
def demo(
    chats: Annotated[int, typer.Option(help="chats to create")] = 5,
    per_chat: Annotated[int, typer.Option(help="messages per chat")] = 40,
) -> None:
    """Run the whole pipeline with demo traffic and print a short report."""
    from sealstream.demo import run_demo

    try:
        run_demo(REPO_ROOT, chats, per_chat, console)
    except StackError as err:
        console.print(f"[red]stack up failed:[/red] {err}")
        raise typer.Exit(1) from None


def _counts(text: str, what: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        console.print(f"[red]{what}: comma-separated whole numbers, e.g. 1,2,3[/red]")
        raise typer.Exit(2) from None


@app.command("bench")
def bench(
    which: Annotated[
        str,
        typer.Argument(
            help="crypto | keys | pipeline | consumer | lifecycle | durability | throughput | "
            "gateway | search | delivery | attachments | all"
        ),
    ] = "all",
    quick: Annotated[
        bool, typer.Option(help="throughput: the smallest run (~2 min), options below override")
    ] = False,
    seconds: Annotated[
        float | None, typer.Option(help="throughput: seconds of load per sustained phase")
    ] = None,
    clients: Annotated[
        int | None, typer.Option(help="throughput: WebSocket clients, one message in flight each")
    ] = None,
    gateways: Annotated[
        str | None, typer.Option(help="throughput: gateway process counts to try, e.g. 1,2")
    ] = None,
    encryptors: Annotated[
        str | None, typer.Option(help="throughput: encryptor process counts, e.g. 1,2,3")
    ] = None,
    plots_dir: Annotated[
        Path | None,
        typer.Option(
            help="throughput: where the PNG plots go (default docs/img; none with --quick)"
        ),
    ] = None,
    plots: Annotated[bool, typer.Option(help="throughput: write the PNG plots")] = True,
    messages: Annotated[
        int, typer.Option(help="search: messages in each index (plain and blind)")
    ] = 1_000_000,
    idle_clients: Annotated[
        int, typer.Option(help="delivery: idle WebSocket clients on one delivery process")
    ] = 2_000,
    rate: Annotated[
        float, typer.Option(help="delivery: messages/s posted (default: half the sustained rate)")
    ] = 700.0,
) -> None:
    """Run benchmarks on this machine and print their figures (docs/benchmarks.md)."""
    from sealstream.bench import (
        attachments_bench,
        consumer_bench,
        crypto_bench,
        delivery_bench,
        durability_bench,
        gateway_bench,
        keys_bench,
        lifecycle_bench,
        pipeline_bench,
        search_bench,
    )

    suites: dict[str, Callable[[], Mapping[str, float | str]]] = {
        "crypto": crypto_bench.run,
        "keys": keys_bench.run,
        "pipeline": pipeline_bench.run,
        "consumer": consumer_bench.run,
        "lifecycle": lifecycle_bench.run,
        "durability": durability_bench.run,
        "gateway": gateway_bench.run,
        "search": lambda: search_bench.run(messages=messages, log=console.print),
        "delivery": lambda: delivery_bench.run(clients=idle_clients, rate=rate, log=console.print),
        "attachments": attachments_bench.run,
    }
    if which == "throughput" or which == "all":
        from dataclasses import replace

        from sealstream.bench import throughput_bench

        config = throughput_bench.QUICK if quick else throughput_bench.ThroughputConfig()
        # A quick run's plots would replace the real ones in docs/img: only where asked.
        wanted = plots and (plots_dir is not None or not quick)
        changes: dict[str, object] = {
            "plots_dir": (plots_dir or REPO_ROOT / "docs" / "img") if wanted else None
        }
        if seconds is not None:
            changes["seconds"] = changes["sweep_seconds"] = seconds
        if clients is not None:
            changes["clients"] = clients
        if gateways is not None:
            changes["gateways"] = _counts(gateways, "--gateways")
        if encryptors is not None:
            changes["encryptors"] = _counts(encryptors, "--encryptors")
        try:
            throughput_config = replace(config, **changes)  # type: ignore[arg-type]
        except ValueError as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
        suites["throughput"] = lambda: _throughput(throughput_config)
    chosen = list(suites) if which == "all" else [which]
    for name in chosen:
        if name not in suites:
            console.print(f"[red]unknown benchmark {name!r}[/red]; choose {', '.join(suites)}, all")
            raise typer.Exit(2)
        console.rule(f"bench {name}")
        figures = suites[name]()
        if name == "throughput":
            continue  # printed its own tables
        table = Table("figure", "value")
        for key, value in figures.items():
            table.add_row(key, f"{value:,.3f}" if isinstance(value, float) else str(value))
        console.print(table)


def _throughput(config: object) -> Mapping[str, float | str]:
    """Run the throughput bench and print its tables; returns the flat figures."""
    from sealstream.bench import throughput_bench

    assert isinstance(config, throughput_bench.ThroughputConfig)
    report = throughput_bench.run(config, log=console.print)
    wide = Console(width=max(console.width, 180))
    table = Table("figure", "Sealstream", "baseline (same run)", "target", title="throughput")
    for row in report.rows:
        table.add_row(row.figure, row.value, row.baseline, row.target)
    wide.print(table)
    sweep = Table(
        "offered msg/s",
        "achieved msg/s",
        "post->ack p50 ms",
        "p99 ms",
        "post->written p50 ms",
        "p99 ms",
        "written samples",
        "errors",
        title="offered-load sweep (WebSocket, one message in flight per client)",
    )
    for p in report.sweep:
        sweep.add_row(
            f"{p.offered:,.0f}",
            f"{p.achieved:,.0f}",
            f"{p.ack_p50_ms:.1f}",
            f"{p.ack_p99_ms:.1f}",
            f"{p.written_p50_ms:.1f}",
            f"{p.written_p99_ms:.1f}",
            str(p.samples),
            str(p.errors),
        )
    wide.print(sweep)
    figures = Table("figure", "value", title="every figure")
    for key, value in report.figures.items():
        figures.add_row(key, f"{value:,.3f}")
    wide.print(figures)
    for note in report.notes:
        console.print(f"note: {note}")
    for path in report.plots:
        console.print(f"plot written: {path}")
    return report.figures


@app.command("drill")
def drill(
    only: Annotated[
        list[str] | None,
        typer.Option("--only", help="Run only these drills (repeatable); default: all nine."),
    ] = None,
    seconds: Annotated[
        float, typer.Option("--seconds", help="Outage of each process or server, in seconds")
    ] = 30.0,
    mode: Annotated[
        str, typer.Option(help="stop-* drills: kill (SIGKILL, a crash) or term (graceful stop)")
    ] = "kill",
    rate: Annotated[float, typer.Option(help="Steady load, messages/s over all clients")] = 20.0,
    clients: Annotated[int, typer.Option(help="Client threads (one chat each)")] = 4,
) -> None:
    """Fault drills on the local stack: steady load while each service is SIGKILLed and each
    server stopped, then lost / duplicated / resurrected counts (docs/operations.md)."""
    from sealstream.drills.harness import ALL_DRILLS, DEFAULT_DRILLS, DrillConfig
    from sealstream.drills.harness import run as run_drills

    names = list(only or DEFAULT_DRILLS)
    unknown = [n for n in names if n not in ALL_DRILLS]
    if unknown or mode not in ("kill", "term"):
        console.print(
            f"[red]unknown drill {', '.join(unknown)} or mode {mode!r}[/red]; drills: "
            f"{', '.join(ALL_DRILLS)}; modes: kill, term"
        )
        raise typer.Exit(2)
    config = DrillConfig(outage_seconds=seconds, server_mode=mode, rate=rate, clients=clients)
    results = run_drills(names, config, log=console.print)
    table = Table(
        "drill",
        "acked",
        "deleted",
        "lost",
        "dup",
        "resurrected",
        "unindexed",
        "gave up",
        "answers while down",
        "max s",
        "500s",
        "hangs",
        "503 no Retry-After",
        "back s",
        "drain s",
        "verdict",
        title=f"fault drills ({seconds:.0f} s outages, servers: {mode}, {rate:.0f} msg/s)",
    )
    for r in results:
        table.add_row(
            r.name,
            str(r.acknowledged),
            str(r.deleted),
            str(len(r.lost)),
            str(r.duplicated),
            str(len(r.resurrected)),
            str(len(r.unindexed)),
            str(r.gave_up),
            " ".join(f"{k}:{v}" for k, v in sorted(r.answers_down.items())) or "-",
            f"{r.max_seconds_down:.1f}",
            str(r.http_500),
            str(r.hangs),
            str(r.no_retry_after),
            "-" if r.restart_seconds is None else f"{r.restart_seconds:.1f}",
            "not drained" if r.drain_seconds is None else f"{r.drain_seconds:.1f}",
            "[green]pass[/green]" if not r.failures else "[red]" + "; ".join(r.failures) + "[/red]",
        )
    Console(width=max(console.width, 200)).print(table)
    for r in results:
        for label, items in (("lost", r.lost), ("resurrected", r.resurrected)):
            if items:
                console.print(f"{r.name} {label}: {', '.join(items[:10])}")
    if any(r.failures for r in results):
        raise typer.Exit(1)


def _add_search() -> None:
    from sealstream.search_cli import search_app

    app.add_typer(search_app, name="search")


_add_search()


def _add_dead_letters() -> None:
    from sealstream.dead_letters_cli import dlq_app

    app.add_typer(dlq_app, name="dlq")


_add_dead_letters()


def _add_attachments() -> None:
    from sealstream.attachments_cli import attachments_app

    app.add_typer(attachments_app, name="attachments")


_add_attachments()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
