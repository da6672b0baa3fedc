"""The configuration the local stack and `migrate` write for durability and retention (no server).

The running servers are checked in tests/integration/test_durability.py; these pin the generated
files and the small rules behind them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from sealstream.adapters.kafka import HOUR_MS, segment_ms_for, topic_configs
from sealstream.services import RestartPolicy
from sealstream.settings import KafkaSettings, Settings, StackSettings
from sealstream.stack.base import StackContext
from sealstream.stack.cassandra import CassandraServer
from sealstream.stack.kafka import KafkaServer
from sealstream.stack.postgres import PostgresServer

REPO = Path(__file__).resolve().parents[2]


def context(tmp_path: Path, **stack: object) -> StackContext:
    return StackContext(settings=StackSettings(dir=tmp_path, **stack), repo_root=REPO)


def test_cassandra_acknowledges_only_synced_writes_by_default(tmp_path: Path) -> None:
    config = yaml.safe_load(CassandraServer(context(tmp_path)).cassandra_yaml())
    assert config["commitlog_sync"] == "batch"
    # Cassandra refuses a sync period outside periodic mode.
    assert "commitlog_sync_period" not in config
    group = CassandraServer(context(tmp_path, cassandra_commitlog_sync="group")).cassandra_yaml()
    assert yaml.safe_load(group)["commitlog_sync_group_window"] == "10ms"


@pytest.mark.parametrize("mode", ["periodic", "group", "batch"])
def test_cassandra_commitlog_mode_can_be_chosen_to_measure_it(tmp_path: Path, mode: str) -> None:
    ctx = context(tmp_path, cassandra_commitlog_sync=mode)
    assert yaml.safe_load(CassandraServer(ctx).cassandra_yaml())["commitlog_sync"] == mode


def test_postgres_syncs_commits_by_default(tmp_path: Path) -> None:
    argv = PostgresServer(context(tmp_path))._durability()
    assert {"fsync=on", "synchronous_commit=on", "full_page_writes=on"} <= set(argv)
    off = PostgresServer(context(tmp_path, postgres_fsync=False))._durability()
    assert {"fsync=off", "synchronous_commit=off"} <= set(off)


def test_kafka_broker_never_elects_a_lagging_replica(tmp_path: Path) -> None:
    lines = KafkaServer(context(tmp_path)).server_properties().splitlines()
    assert "unclean.leader.election.enable=false" in lines
    assert "log.retention.check.interval.ms=300000" in lines


@pytest.mark.parametrize("retention_ms", [1, 60_000, 3_600_000, 86_400_000, 7 * 86_400_000])
def test_segments_roll_well_within_the_retention(retention_ms: int) -> None:
    segment = segment_ms_for(retention_ms)
    assert 1 <= segment <= max(1, retention_ms // 4)
    assert segment <= HOUR_MS


def test_every_topic_gets_retention_durability_and_a_segment_roll() -> None:
    kafka = KafkaSettings(min_insync_replicas=2, replication_factor=3)
    configs = topic_configs(kafka)
    assert set(configs) == {kafka.messages_topic, kafka.dead_letter_topic, kafka.changes_topic}
    for config in configs.values():
        assert int(config["segment.ms"]) <= int(config["retention.ms"])
        assert config["min.insync.replicas"] == "2"
        assert config["unclean.leader.election.enable"] == "false"


def test_min_insync_replicas_above_the_replication_factor_is_refused() -> None:
    with pytest.raises(ValueError, match="min_insync_replicas"):
        Settings(kafka=KafkaSettings(replication_factor=1, min_insync_replicas=2))


def test_restart_backoff_doubles_up_to_its_cap() -> None:
    policy = RestartPolicy(backoff_seconds=1.0, max_backoff_seconds=16.0)
    assert [policy.delay(n) for n in range(7)] == [1.0, 2.0, 4.0, 8.0, 16.0, 16.0, 16.0]
