"""Redis from Debian's package, bound to loopback, persistence off (it only holds a cache)."""

from __future__ import annotations

import redis

from sealstream.stack.base import Server, apt_install


class RedisServer(Server):
    name = "redis"
    start_timeout = 30.0

    @property
    def port(self) -> int:
        return self.ctx.settings.redis_port

    def install(self) -> None:
        apt_install("redis-server", "redis-server")

    def argv(self) -> list[str]:
        return [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data),
            # Redis holds wrapped DEKs and pointers that are rebuilt from Postgres on a miss.
            "--save",
            "",
            "--appendonly",
            "no",
            "--daemonize",
            "no",
        ]

    def probe(self) -> str:
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2)
        try:
            if not client.ping():
                raise ConnectionError("PING did not answer PONG")
            return f"Redis {client.info('server')['redis_version']}"
        finally:
            client.close()
