"""RecordingPlane: an in-memory data plane for unit tests. It records every call, keeps
SAs and policies in dicts, refuses what the kernel would refuse (a duplicate SA, deleting
what is not there) and lets a test inject events with `fire`."""

from __future__ import annotations

import itertools
from dataclasses import replace
from typing import Any

from .base import (
    DataPlane,
    DataPlaneError,
    DataPlaneEvent,
    EventSink,
    IpsecProto,
    PolicyId,
    PolicySpec,
    SaCounters,
    SaId,
    SaSpec,
    UdpEncap,
    is_keyway_reqid,
)


class RecordingPlane(DataPlane):
    name = "recording"

    def __init__(self, first_spi: int = 0xC0000001) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.sas: dict[SaId, SaSpec] = {}
        self.policies: dict[PolicyId, PolicySpec] = {}
        self.counters: dict[SaId, SaCounters] = {}
        self.started = False
        self._spis = itertools.count(first_spi)  # deterministic, so tests can expect them
        self._sink: EventSink | None = None

    async def start(self, events: EventSink) -> None:
        self.calls.append(("start", None))
        self._sink = events
        self.started = True

    async def stop(self) -> None:
        self.calls.append(("stop", None))
        self.started = False

    def prepare_ike_socket(self, sock) -> None:
        self.calls.append(("prepare_ike_socket", sock))

    def fire(self, event: DataPlaneEvent) -> None:
        """Deliver `event` to the sink given to start(), as the kernel would."""
        if self._sink is None:
            raise RuntimeError("RecordingPlane.fire before start")
        self._sink(event)

    def allocate_spi(self, src: str, dst: str, proto: IpsecProto, reqid: int) -> int:
        self.calls.append(("allocate_spi", (src, dst, proto, reqid)))
        return next(self._spis)

    def install_sa(self, sa: SaSpec) -> None:
        self.calls.append(("install_sa", sa))
        if sa.id in self.sas:
            raise DataPlaneError(f"install_sa {sa.proto} spi 0x{sa.spi:08x} {sa.dst}: exists")
        self.sas[sa.id] = sa
        self.counters[sa.id] = SaCounters()

    def update_sa(self, sa: SaSpec) -> None:
        self.calls.append(("update_sa", sa))
        if sa.id not in self.sas:
            raise DataPlaneError(f"update_sa {sa.proto} spi 0x{sa.spi:08x} {sa.dst}: no such SA")
        self.sas[sa.id] = sa

    def move_sa(self, sa: SaId, src: str, dst: str, encap: UdpEncap | None) -> SaSpec:
        self.calls.append(("move_sa", (sa, src, dst, encap)))
        spec = self.sas.get(sa)
        if spec is None:
            raise DataPlaneError(f"move_sa {sa.proto} spi 0x{sa.spi:08x} {sa.dst}: no such SA")
        moved = replace(spec, src=src, dst=dst, encap=encap)
        if moved.id != sa and moved.id in self.sas:
            raise DataPlaneError(f"move_sa {sa.proto} spi 0x{sa.spi:08x} {dst}: exists")
        del self.sas[sa]
        self.sas[moved.id] = moved
        self.counters[moved.id] = self.counters.pop(sa)
        return moved

    def delete_sa(self, sa: SaId) -> None:
        self.calls.append(("delete_sa", sa))
        if self.sas.pop(sa, None) is None:
            raise DataPlaneError(f"delete_sa {sa.proto} spi 0x{sa.spi:08x} {sa.dst}: no such SA")
        self.counters.pop(sa, None)

    def list_sas(self) -> list[SaSpec]:
        self.calls.append(("list_sas", None))
        return [sa for sa in self.sas.values() if is_keyway_reqid(sa.reqid)]

    def sa_counters(self, sa: SaId) -> SaCounters:
        self.calls.append(("sa_counters", sa))
        if sa not in self.counters:
            raise DataPlaneError(f"sa_counters {sa.proto} spi 0x{sa.spi:08x}: no such SA")
        return self.counters[sa]

    def install_policy(self, policy: PolicySpec) -> None:
        self.calls.append(("install_policy", policy))
        if policy.id in self.policies:
            raise DataPlaneError(f"install_policy {policy.id}: exists")
        self.policies[policy.id] = policy

    def update_policy(self, policy: PolicySpec) -> None:
        self.calls.append(("update_policy", policy))
        if policy.id not in self.policies:
            raise DataPlaneError(f"update_policy {policy.id}: no such policy")
        self.policies[policy.id] = policy

    def remove_policy(self, policy: PolicyId) -> None:
        self.calls.append(("remove_policy", policy))
        if self.policies.pop(policy, None) is None:
            raise DataPlaneError(f"remove_policy {policy}: no such policy")

    def list_policies(self) -> list[PolicySpec]:
        self.calls.append(("list_policies", None))
        return list(self.policies.values())

    def flush_owned(self) -> None:
        self.calls.append(("flush_owned", None))
        self.policies.clear()
        for sa_id in [k for k, v in self.sas.items() if is_keyway_reqid(v.reqid)]:
            del self.sas[sa_id]
            self.counters.pop(sa_id, None)

    def count(self, sa: SaId, nbytes: int, packets: int = 1) -> None:
        """Test helper: account traffic on an SA."""
        c = self.counters[sa]
        self.counters[sa] = replace(c, bytes=c.bytes + nbytes, packets=c.packets + packets)
