"""Per-tenant KMS routing: the `Kms` port over one Transit client per KMS cluster.

A tenant's master key (CMK) lives on the default cluster (`tenants.kms_address` NULL) or on the
cluster of its region: `tenants.kms_address` holds the region *name*, a key of
`SEALSTREAM_VAULT__CLUSTERS` whose address and token come from the settings (so moving a cluster
is a configuration change, and no address or token is ever stored in Postgres). Every call names
a master key; the router asks Postgres once which region that key belongs to and remembers it
(a key belongs to one region for good: `KeyService.register_tenant` refuses to move it).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from sealstream.adapters.postgres import TenantRow
from sealstream.adapters.vault import TransitKms
from sealstream.errors import KmsError
from sealstream.keys.ports import DataKey
from sealstream.settings import VaultSettings


class KmsRouter:
    """Sends each master-key operation to the cluster of the tenant owning that key.

    Keys no tenant owns (yet) go to the default cluster. Clients of other regions are built on
    first use, so a process only needs the tokens of the regions it actually serves.
    """

    def __init__(
        self,
        settings: VaultSettings,
        placements: Callable[[str], list[TenantRow]],
        default: TransitKms | None = None,
        deadline: float | None = None,
    ) -> None:
        """`deadline`: seconds a KMS call may take, retries included (None: the adapter's
        defaults); the gateway sets it so that chat creation fails fast when the KMS hangs."""
        self.settings = settings
        self._placements = placements
        self._deadline = deadline
        self._default = default or self._transit(settings)
        self._clients: dict[str, TransitKms] = {}
        self._regions: dict[str, str | None] = {}
        self._lock = threading.Lock()

    def at(self, region: str | None, tenant_id: str | None = None) -> TransitKms:
        """The client of a region's cluster (None: the default one)."""
        if region is None:
            return self._default
        with self._lock:
            client = self._clients.get(region)
            if client is None:
                client = self._clients[region] = self._build(region, tenant_id)
        return client

    def _build(self, region: str, tenant_id: str | None) -> TransitKms:
        who = f"tenant '{tenant_id}' is in region '{region}'" if tenant_id else f"region '{region}'"
        if region not in self.settings.clusters:
            raise KmsError(
                f"{who}, which has no KMS cluster configured (SEALSTREAM_VAULT__CLUSTERS knows "
                f"{sorted(self.settings.clusters) or 'none'})"
            )
        try:
            return self._transit(self.settings.for_region(region))
        except ValueError as exc:  # no token: the message names the variable or file, not a token
            raise KmsError(f"{who}, whose KMS cluster has no usable token: {exc}") from None

    def _transit(self, settings: VaultSettings) -> TransitKms:
        if self._deadline is None:
            return TransitKms(settings)
        return TransitKms(settings, retry_seconds=self._deadline, timeout=self._deadline)

    def client(self, key_name: str) -> TransitKms:
        """The client of the cluster holding master key `key_name`."""
        if key_name in self._regions:
            return self.at(self._regions[key_name])
        owners = self._placements(key_name)
        regions = {p.region for p in owners}
        if len(regions) > 1:
            raise KmsError(f"master key '{key_name}' is registered in several regions")
        if not owners:
            return self._default  # not remembered: a tenant may claim the key later
        client = self.at(owners[0].region, owners[0].tenant_id)
        self._regions[key_name] = owners[0].region
        return client

    # --- the Kms port ----------------------------------------------------------------------------

    def ensure_key(self, key_name: str) -> None:
        self.client(key_name).ensure_key(key_name)

    def generate_data_key(self, key_name: str, context: bytes) -> DataKey:
        return self.client(key_name).generate_data_key(key_name, context)

    def unwrap(self, key_name: str, wrapped: str, context: bytes) -> bytes:
        return self.client(key_name).unwrap(key_name, wrapped, context)

    def rewrap(self, key_name: str, wrapped: str, context: bytes) -> str:
        return self.client(key_name).rewrap(key_name, wrapped, context)

    def rewrap_batch(self, key_name: str, items: list[tuple[str, bytes]]) -> list[str]:
        return self.client(key_name).rewrap_batch(key_name, items)

    def rotate_master_key(self, key_name: str) -> int:
        return self.client(key_name).rotate_master_key(key_name)
