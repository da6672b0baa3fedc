# ruff: noqa: RUF001 - chat messages in other scripts are what this bench measures
"""Indexer CPU per message: the indexer's own batch logic (`indexer.logic.index_batch`) on
multilingual chat messages against a real OpenSearch, without Kafka.

Prints the indexer process's CPU (user + system, every thread) per message and, given the node's
pid (`--node-pid`, a local-stack node on this machine), the node's CPU per message, so the cost of
moving analysis into OpenSearch (`_analyze`) shows on both sides. Usage:

    python -m sealstream.bench.analysis_bench [--messages 20000] [--batch 1000] [--node-pid PID]

Uses an index of its own (`<prefix>-bench-analysis-messages`), dropped at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import time
import uuid
from pathlib import Path

from indexer.logic import index_batch
from schemas.ids import SnowflakeIds
from sealstream.adapters.opensearch import SearchIndex
from sealstream.settings import Settings
from sealstream.streaming import RawRecord

SENTENCES = [
    "The quick brown fox jumps over the lazy dog, see you at 5?",
    "Le café est très bon à Paris, on se retrouve demain matin",
    "¿Dónde está la estación de tren? Llego en diez minutos",
    "Die Straße ist sehr groß und heute gesperrt, nimm die U-Bahn",
    "Москва — столица России, я купил ёлку вчера вечером",
    "Ο Σωκράτης ήταν σοφός και δάσκαλος του Πλάτωνα",
    "مرحبا بكم في القاهرة، الاجتماع غدا في الساعة العاشرة",
    "שלום עולם, מה שלומך? נתראה מחר בבוקר",
    "मैं दिल्ली में रहता हूँ और कल मुंबई जाऊँगा",
    "ผมชอบกินข้าวผัดมาก พรุ่งนี้เจอกันนะ",
    "我喜欢吃北京烤鸭，明天我们一起去吧",
    "東京都に住んでいます。明日の会議は十時からです",
    "서울에서 친구를 만났어요 내일 다시 연락할게요",
    "Tôi yêu Việt Nam và Đà Nẵng, hẹn gặp lại",
    "Meeting at 東京 tomorrow 🎉 très bien! Привет 👍🏽",
    "ok",
    "lol 😂😂 that was great, thanks for the photos",
]


def records(chat: uuid.UUID, ids: SnowflakeIds, count: int) -> list[RawRecord]:
    out = []
    for n in range(count):
        text = f"{SENTENCES[n % len(SENTENCES)]} #{n}"
        value = {
            "message_id": ids.next_id(),
            "chat_id": str(chat),
            "sender_id": "alice",
            "text": text,
            "sent_at": "2026-12-01T10:00:00+00:00",
        }
        out.append(RawRecord("bench", 0, n, str(chat).encode(), json.dumps(value).encode()))
    return out


def node_cpu(pid: int | None) -> float:
    """Seconds of CPU (user + system) the process `pid` used so far; 0 without a pid."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=1000)
    parser.add_argument("--node-pid", type=int, default=None)
    args = parser.parse_args()
    settings = Settings()
    cfg = settings.opensearch.model_copy(
        update={"index_prefix": f"{settings.opensearch.index_prefix}-bench-analysis"}
    )
    index = SearchIndex(cfg)
    index.drop()
    index.migrate()
    ids = SnowflakeIds(11)
    try:
        index_batch(records(uuid.uuid4(), ids, args.batch), index)  # warm-up, not counted
        batches = [
            records(uuid.uuid4(), ids, args.batch)
            for _ in range(max(1, args.messages // args.batch))
        ]
        total = sum(len(batch) for batch in batches)
        cpu, wall, node = time.process_time(), time.perf_counter(), node_cpu(args.node_pid)
        for batch in batches:
            if index_batch(batch, index):
                raise RuntimeError("the index refused documents")
        cpu = time.process_time() - cpu
        wall = time.perf_counter() - wall
        node = node_cpu(args.node_pid) - node
        print(f"messages:             {total} in batches of {args.batch}")
        print(f"indexer CPU/message:  {cpu / total * 1000:.4f} ms")
        print(f"wall/message:         {wall / total * 1000:.4f} ms")
        if args.node_pid is not None:
            print(f"OpenSearch CPU/msg:   {node / total * 1000:.4f} ms")
        print(f"load average:         {os.getloadavg()}")
    finally:
        index.drop()
        index.close()


if __name__ == "__main__":
    main()
