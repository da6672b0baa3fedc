"""`sealstream search ...`: the blind index's operator commands (turn on, rotate the index key,
run or resume a tenant's re-index, show progress). Registered on the main CLI in cli.py."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

search_app = typer.Typer(
    help="Search: the blind index (per-tenant keyed tokens) and its re-index.",
    no_args_is_help=True,
)
console = Console()

Tenant = Annotated[str, typer.Option("--tenant", help="tenant id")]
Reason = Annotated[str, typer.Option(help="why (recorded in the audit trail)")]


@contextmanager
def _blind() -> Iterator[tuple[Any, Any, Any, Any]]:
    from sealstream.adapters.postgres import Database
    from sealstream.settings import Settings
    from sealstream.wiring import index_keys, key_service, message_stores

    settings = Settings()
    database = Database(settings.postgres)
    database.open()
    try:
        with (
            message_stores(settings) as (store, index),
            key_service(settings, database, actor="cli") as keys,
        ):
            yield index_keys(settings, database, actor="cli"), keys, store, index
    finally:
        database.close()


def _run_reindex(tenant: str) -> None:
    from sealstream.search_reindex import ReindexBusy, reindex_tenant

    with _blind() as (index_keys, keys, store, index):

        def show(**counters: object) -> None:
            console.print("  " + ", ".join(f"{k} {v}" for k, v in counters.items()))

        try:
            report = reindex_tenant(index_keys, keys, store, index, tenant, progress=show)
        except ReindexBusy as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(3) from None
    state = "complete" if report.completed else "[yellow]incomplete: run it again later[/yellow]"
    console.print(
        f"tenant {tenant}: re-index under index key v{report.target_version} {state}: "
        f"{report.chats} chats, {report.messages} messages, {report.swept} swept, "
        f"{report.orphans_removed} orphan documents removed, index key versions destroyed "
        f"{report.index_key_versions_destroyed or 'none'}, overwritten versions purged from the "
        f"data folder: {report.history_purged} ({report.seconds:.1f}s)"
    )
    if not (report.completed and report.history_purged):
        raise typer.Exit(1)


@search_app.command("reindex")
def search_reindex(tenant: Tenant) -> None:
    """Run or resume the tenant's re-index under its newest index key (resumable)."""
    _run_reindex(tenant)


@search_app.command("blind-on")
def search_blind_on(tenant: Tenant, reason: Reason = "operator", now: bool = True) -> None:
    """Turn the blind index on for a tenant (index key v1), then re-index it (--no-now: later)."""
    from sealstream.adapters.postgres import IndexKeyConflict

    with _blind() as (index_keys, _, _, _):
        try:
            version = index_keys.enable(tenant, reason)
        except IndexKeyConflict as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    console.print(f"tenant {tenant}: blind index enabling, index key v{version}")
    if now:
        _run_reindex(tenant)


@search_app.command("rotate-key")
def search_rotate_key(tenant: Tenant, reason: Reason = "operator", now: bool = True) -> None:
    """Rotate the tenant's index key, then re-index it (the old key is destroyed at the end)."""
    from sealstream.adapters.postgres import IndexKeyConflict

    with _blind() as (index_keys, _, _, _):
        try:
            version = index_keys.rotate(tenant, reason)
        except IndexKeyConflict as err:
            console.print(f"[red]{err}[/red]")
            raise typer.Exit(2) from None
    console.print(f"tenant {tenant}: index key v{version} active")
    if now:
        _run_reindex(tenant)


@search_app.command("status")
def search_status(
    tenant: Annotated[str | None, typer.Option("--tenant", help="only this tenant")] = None,
) -> None:
    """Blind-index mode, index-key versions and re-index progress of each tenant with one."""
    with _blind() as (index_keys, _, _, _):
        jobs = index_keys.repo.reindex_jobs()
        table = Table(
            "tenant", "mode", "key versions", "re-index", "chats", "messages", "swept", "updated"
        )
        for job in jobs:
            if tenant is not None and job.tenant_id != tenant:
                continue
            versions = ", ".join(
                f"v{r.key_version} {r.state}" for r in index_keys.repo.keys(job.tenant_id)
            )
            table.add_row(
                job.tenant_id,
                index_keys.repo.mode(job.tenant_id) or "?",
                versions,
                f"{job.state} (v{job.target_version})",
                str(job.chats_done),
                str(job.messages_done),
                str(job.swept),
                job.updated_at.isoformat(timespec="seconds"),
            )
    console.print(table)
