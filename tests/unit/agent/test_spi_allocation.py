"""Issue 14, item 10: Child SA SPIs come from the data plane (the kernel's ALLOCSPI),
asked by keywayd for the child's reqid, not from os.urandom in the engine."""

from __future__ import annotations

import os

import yaml

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.daemon import Agent
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.base import IpsecProto
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.fake import RecordingPlane
from tests.unit.engine.test_establish import A, B, lab_pair


class Allocator:
    """An SPI allocator that counts up from `first` and records what it was asked."""

    def __init__(self, first: int) -> None:
        self.next, self.asked = first, []

    def __call__(self, *request: str) -> int:
        self.asked.append(request)
        self.next += 1
        return self.next - 1


def test_the_engine_proposes_and_keys_the_spis_its_allocator_gives():
    pair = lab_pair()
    pair.a._spi_allocator, pair.b._spi_allocator = Allocator(0x1000), Allocator(0x2000)
    pair.a.initiate("h1-h2", 0.0)
    pair.pump()
    (child_a,) = pair.a.sas()[0].children.values()
    (child_b,) = pair.b.sas()[0].children.values()
    assert (child_a.spi_in, child_a.spi_out) == (0x1000, 0x2000)
    assert (child_b.spi_in, child_b.spi_out) == (0x2000, 0x1000)
    assert pair.a._spi_allocator.asked == [("h1-h2", "sites", "esp", B[0])]
    assert pair.b._spi_allocator.asked == [("h1-h2", "sites", "esp", A[0])]


def test_keywayd_asks_the_plane_for_the_child_s_reqid(tmp_path):
    path = tmp_path / "keywayd.yml"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    with os.fdopen(fd, "w") as handle:
        yaml.safe_dump({"connections": {}}, handle)
    plane = RecordingPlane()
    agent = Agent(path, plane=plane)
    spis = [
        agent._allocate_spi("192.0.2.12", "ab", "sites", "esp", "192.0.2.11"),
        agent._allocate_spi("192.0.2.12", "ab", "voice", "ah", "192.0.2.11"),
        agent._allocate_spi("192.0.2.12", "ab", "sites", "esp", "192.0.2.11"),
    ]
    assert spis == [0xC0000001, 0xC0000002, 0xC0000003]
    sites, voice = agent._reqid("ab", "sites"), agent._reqid("ab", "voice")
    assert sites != voice
    assert [args for call, args in plane.calls if call == "allocate_spi"] == [
        ("192.0.2.11", "192.0.2.12", IpsecProto.ESP, sites),  # src: the peer, dst: us
        ("192.0.2.11", "192.0.2.12", IpsecProto.AH, voice),
        ("192.0.2.11", "192.0.2.12", IpsecProto.ESP, sites),
    ]
    assert agent._child_state("ab", "sites").reqid == sites  # its SAs and policies'
