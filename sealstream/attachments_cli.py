"""`sealstream attachments ...`: operator commands of the attachment store. Registered on the main
CLI in cli.py.

`sweep-uploads` aborts multipart uploads abandoned for longer than a threshold (an upload whose
client died before completing or aborting it): its parts hold ciphertext that no reader can reach,
and they take space until aborted. Stores with lifecycle rules get a rule from `sealstream
migrate` instead; S3Proxy has none, so run this on a schedule there (docs/operations.md, "Object
store").
"""

from __future__ import annotations

from datetime import timedelta
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

attachments_app = typer.Typer(
    help="Attachments: the object store that holds encrypted files.", no_args_is_help=True
)
console = Console()


@attachments_app.command("sweep-uploads")
def sweep_uploads(
    older_than_hours: Annotated[
        float | None,
        typer.Option(
            help="abort uploads started longer ago than this "
            "(default: SEALSTREAM_OBJECT_STORE__ABANDONED_UPLOAD_HOURS, 24)",
            min=0,
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help="list what would be aborted, abort nothing")
    ] = False,
) -> None:
    """Abort incomplete multipart uploads older than a threshold (ListMultipartUploads, then
    AbortMultipartUpload for each); prints one row per upload. Idempotent."""
    from datetime import UTC, datetime

    from sealstream.adapters.object_store import ObjectStore, ObjectStoreError
    from sealstream.settings import Settings

    settings = Settings().object_store
    hours = settings.abandoned_upload_hours if older_than_hours is None else older_than_hours
    store = ObjectStore(settings)
    try:
        if dry_run:
            cutoff = datetime.now(UTC) - timedelta(hours=hours)
            chosen = [u for u in store.incomplete_uploads() if u.started < cutoff]
        else:
            chosen = store.abort_incomplete(timedelta(hours=hours))
    except ObjectStoreError as err:
        console.print(f"[red]sweep failed:[/red] {err}")
        raise typer.Exit(1) from None
    finally:
        store.close()
    table = Table("key", "upload id", "started (UTC)", "parts")
    for upload in chosen:
        table.add_row(upload.key, upload.upload_id, upload.started.isoformat(), str(upload.parts))
    # Wide enough that keys and upload ids are never wrapped (they are copied into S3 calls).
    Console(width=max(console.width, 200)).print(table)
    verb = "would abort" if dry_run else "aborted"
    console.print(
        f"{verb} {len(chosen)} upload(s) started over {hours:g} h ago in {settings.bucket}"
    )


@attachments_app.command("sweep-drafts")
def sweep_drafts_command(
    older_than_hours: Annotated[
        float, typer.Option(help="delete uploads unsent for longer than this", min=1)
    ] = 24.0,
) -> None:
    """Delete uploads no message referenced (drafts) older than a threshold, in every active
    chat: rows marked deleted, then objects deleted. Idempotent; run it on a schedule."""
    from contextlib import closing

    from sealstream.adapters.object_store import ObjectStore, ObjectStoreError
    from sealstream.errors import StoreUnavailable
    from sealstream.lifecycle import sweep_drafts
    from sealstream.settings import Settings
    from sealstream.wiring import key_service, message_stores

    settings = Settings()
    try:
        with (
            message_stores(settings) as (store, _index),
            key_service(settings, actor="cli") as keys,
            closing(ObjectStore(settings.object_store)) as objects,
        ):
            report = sweep_drafts(keys, store, objects, timedelta(hours=older_than_hours))
    except (ObjectStoreError, StoreUnavailable) as err:
        console.print(f"[red]sweep failed (run it again):[/red] {err}")
        raise typer.Exit(1) from None
    console.print(
        f"{report.chats} chats: {report.drafts_deleted} unsent uploads older than "
        f"{older_than_hours:g} h deleted, {report.objects_deleted} objects removed"
    )
