"""Run a UserspacePlane with hand-installed SAs and policies (tests, benchmarks).

    ip netns exec NS python -m <package>.esp.runner < config.json-line + commands

The first stdin line is a JSON object {"tun": str, "own_udp_port": int|null, "sas": [...],
"policies": [...]} (keys as hex: stdin, never argv, so they are not visible in ps). The
runner then prints "ready" and answers stdin lines: "stats" prints one JSON line of
per-reason drops and per-SA counters; "quit" (or EOF) stops the plane and exits.
"""

from __future__ import annotations

import asyncio
import json
import sys
from dataclasses import asdict

from ..dataplane.base import (
    Direction,
    IpsecProto,
    Lifetime,
    Mode,
    PolicyAction,
    PolicySpec,
    SaSpec,
    Selector,
    Template,
    UdpEncap,
)
from ..dataplane.userspace import UserspacePlane


def sa_from(d: dict) -> SaSpec:
    return SaSpec(
        src=d["src"],
        dst=d["dst"],
        proto=IpsecProto(d.get("proto", "esp")),
        spi=d["spi"],
        mode=Mode(d.get("mode", "tunnel")),
        reqid=d["reqid"],
        enc_alg=d.get("enc_alg"),
        enc_key=bytes.fromhex(d.get("enc_key", "")),
        integ_alg=d.get("integ_alg"),
        integ_key=bytes.fromhex(d.get("integ_key", "")),
        selector=Selector(**d["selector"]) if d.get("selector") else None,
        encap=UdpEncap(**d["encap"]) if d.get("encap") else None,
        replay_window=d.get("replay_window", 128),
        esn=d.get("esn", True),
        lifetime=Lifetime(**d.get("lifetime", {})),
    )


def policy_from(d: dict) -> PolicySpec:
    return PolicySpec(
        selector=Selector(**d["selector"]),
        direction=Direction(d["direction"]),
        action=PolicyAction(d.get("action", "protect")),
        templates=tuple(
            Template(
                IpsecProto(t.get("proto", "esp")),
                Mode(t.get("mode", "tunnel")),
                t["reqid"],
                t.get("src", ""),
                t.get("dst", ""),
            )
            for t in d.get("templates", ())
        ),
    )


async def main() -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    config = json.loads(await reader.readline())
    events: list[str] = []
    plane = UserspacePlane(config.get("tun", "kw-esp0"), own_udp_port=config.get("own_udp_port"))
    for sa in config.get("sas", ()):
        plane.install_sa(sa_from(sa))
    for policy in config.get("policies", ()):
        plane.install_policy(policy_from(policy))
    await plane.start(lambda event: events.append(type(event).__name__))
    print("ready", flush=True)
    try:
        while line := (await reader.readline()).decode().strip():
            if line == "quit":
                break
            if line == "stats":
                sas = {f"0x{s.spi:08x}": asdict(plane.sa_counters(s.id)) for s in plane.list_sas()}
                print(
                    json.dumps({"drops": dict(plane.drops), "sas": sas, "events": events}),
                    flush=True,
                )
    finally:
        await plane.stop()


if __name__ == "__main__":
    asyncio.run(main())
