"""`sealstream demo`: the whole pipeline with demo traffic, ending in a short report.

Starts the local stack if needed, applies the schemas, runs the pipeline services and live
delivery as child processes, creates chats and posts messages over the gateway's HTTP API, then
reads them back and searches them through the reader's API, and prints what happened. Everything it talks to is real.
"""

from __future__ import annotations

import os
import random
import subprocess
import time
from pathlib import Path

import httpx
from rich.console import Console
from rich.table import Table

from sealstream.auth import mint_token
from sealstream.migrate import migrate_all
from sealstream.services import service_urls, spawn, stop, wait_for, wait_ready
from sealstream.settings import Settings, StackSettings
from sealstream.stack import runner
from sealstream.stack.base import StackContext

WORDS = (
    "orbit lantern meadow copper violet harbor quartz ember willow signal falcon marble "
    "thunder saffron glacier cinder lotus prism nectar velvet"
).split()


def _metric(url: str, name: str) -> float:
    """Sum of a Prometheus counter's samples on a service's /metrics page."""
    total = 0.0
    for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
        if line.startswith(name) and not line.startswith("#"):
            total += float(line.rsplit(" ", 1)[1])
    return total


def run_demo(
    repo_root: Path, chats: int = 5, per_chat: int = 40, console: Console | None = None
) -> None:
    console = console or Console()
    settings = Settings()
    console.rule("[bold]Sealstream demo")
    runner.up(
        runner.build(StackContext(settings=StackSettings(), repo_root=repo_root)),
        report=console.print,
    )
    for part, result in migrate_all(settings).items():
        console.print(f"migrate {part:<11} {result}")

    children: list[subprocess.Popen[bytes]] = []
    logs = StackSettings().dir / "services"
    logs.mkdir(parents=True, exist_ok=True)
    try:
        for name in ("ingest", "encryptor", "indexer", "reader", "delivery"):
            children.append(spawn(name, dict(os.environ), logs / f"{name}.log"))
        urls = service_urls(settings)
        wait_ready(urls, 90)
        console.print(
            f"services   ingest, encryptor, indexer, reader, delivery: all ready (logs in {logs}/)"
        )
        _traffic(settings, urls, chats, per_chat, console)
    finally:
        stop(children)
        console.print("services   stopped (the stack keeps running: `sealstream stack down`)")


def _traffic(
    settings: Settings, urls: dict[str, str], chats: int, per_chat: int, console: Console
) -> None:
    rng = random.Random(7)  # noqa: S311 - demo text, reproducible on purpose
    users = ["ada", "grace", "alan", "edsger", "barbara", "ken"]
    auth = {u: {"Authorization": f"Bearer {mint_token(settings.auth, u)}"} for u in users}
    kms_before = _metric(urls["encryptor"], "sealstream_kms_calls_total")
    with httpx.Client(timeout=30) as http:
        chat_ids: list[tuple[str, str, str]] = []
        for _ in range(chats):
            owner, member = rng.sample(users, 2)
            created = http.post(
                f"{urls['ingest']}/v1/chats", json={"participants": [member]}, headers=auth[owner]
            )
            created.raise_for_status()
            chat_ids.append((created.json()["chat_id"], owner, member))

        started = time.monotonic()
        posted = 0
        for chat_id, owner, _ in chat_ids:
            texts = [f"{' '.join(rng.sample(WORDS, 4))} #{i} — ünïcödé ✓" for i in range(per_chat)]
            response = http.post(
                f"{urls['ingest']}/v1/chats/{chat_id}/messages:batch",
                json={"messages": [{"text": t} for t in texts]},
                headers=auth[owner],
            )
            response.raise_for_status()
            posted += len(texts)
        post_seconds = time.monotonic() - started

        def all_readable() -> bool:
            for chat_id, _, member in chat_ids:
                page = http.get(
                    f"{urls['reader']}/v1/chats/{chat_id}/messages",
                    params={"limit": per_chat},
                    headers=auth[member],
                ).json()
                if len(page.get("messages", [])) < per_chat:
                    return False
            return True

        wait_for(all_readable, 120, "every message readable")
        readable_seconds = time.monotonic() - started

        chat_id, owner, member = chat_ids[0]
        word = "lantern"
        wait_for(
            lambda: bool(
                http.get(
                    f"{urls['reader']}/v1/chats/{chat_id}/search",
                    params={"q": word},
                    headers=auth[member],
                )
                .json()
                .get("messages")
            ),
            60,
            "search results",
        )
        hits = http.get(
            f"{urls['reader']}/v1/chats/{chat_id}/search", params={"q": word}, headers=auth[member]
        ).json()["messages"]
        outsider = next(u for u in users if u not in (owner, member))
        refused = http.get(f"{urls['reader']}/v1/chats/{chat_id}/messages", headers=auth[outsider])

        # An attachment: uploaded (encrypted on the way into the object store), referenced by a
        # message, downloaded whole and in a range by the other participant, refused to others.
        data = rng.randbytes(3 * 1024 * 1024 + 12_345)
        uploaded = http.post(
            f"{urls['ingest']}/v1/chats/{chat_id}/attachments",
            content=data,
            headers={**auth[owner], "Content-Type": "application/pdf"},
        )
        uploaded.raise_for_status()
        attachment = uploaded.json()["attachment_id"]
        http.post(
            f"{urls['ingest']}/v1/chats/{chat_id}/messages",
            json={"text": "the report, attached", "attachments": [attachment]},
            headers=auth[owner],
        ).raise_for_status()
        file_url = f"{urls['reader']}/v1/chats/{chat_id}/attachments/{attachment}"
        whole = http.get(file_url, headers=auth[member])
        part = http.get(file_url, headers={**auth[member], "Range": "bytes=65530-65545"})
        file_refused = http.get(file_url, headers=auth[outsider])
        if whole.content != data or part.content != data[65530:65546]:
            raise RuntimeError("the attachment did not come back byte for byte")

    kms_calls = _metric(urls["encryptor"], "sealstream_kms_calls_total") - kms_before
    table = Table(title="Demo report", show_header=False)
    table.add_row("chats created", str(chats))
    table.add_row("messages posted (HTTP, batched)", f"{posted} in {post_seconds:.2f}s")
    table.add_row("all readable back, decrypted, after", f"{readable_seconds:.2f}s")
    table.add_row(
        f"search '{word}' in chat 1",
        f"{len(hits)} hits, e.g. {hits[0]['text']!r}" if hits else "0 hits",
    )
    table.add_row(f"outsider '{outsider}' reading chat 1", f"HTTP {refused.status_code}")
    table.add_row(
        "attachment (3 MiB, encrypted at rest)",
        f"uploaded, downloaded whole (HTTP {whole.status_code}) and a 16-byte range across a "
        f"segment boundary (HTTP {part.status_code}), byte for byte",
    )
    table.add_row(f"outsider '{outsider}' downloading it", f"HTTP {file_refused.status_code}")
    table.add_row(
        "KMS calls by the encryptor this run", f"{kms_calls:.0f} (per chat, not per message)"
    )
    console.print(table)
