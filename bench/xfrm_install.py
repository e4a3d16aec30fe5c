"""XFRM policies and SAs installed per second through keyway's netlink layer
(KernelPlane), against `ip -batch` installing the same ones in the same run, as a ratio.

Each side works in a fresh namespace of its own and installs N tunnel-mode OUT policies
(distinct /32 selector pairs, ESP template), then N AES-GCM ESP SAs when the kernel
accepts ESP (this machine's does not: run it in the VM tier for SAs,
`tools/vm_run.py -- python bench/xfrm_install.py`).

Run as root from the repository root after the test suite has created .collections:
    .venv/bin/python bench/xfrm_install.py [N]      (default: 2000)
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / ".collections"))

from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane import (
    base,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.dataplane.xfrm.plane import (
    KernelPlane,
    probe_kernel_esp,
)

REQID = base.KEYWAY_REQID_MIN + 1
OUTER = ("192.0.2.1", "192.0.2.2")


def selector(n: int) -> tuple[str, str]:
    return f"10.1.{n >> 8 & 255}.{n & 255}/32", f"10.2.{n >> 8 & 255}.{n & 255}/32"


def policies(n: int) -> list[base.PolicySpec]:
    template = base.Template(base.IpsecProto.ESP, base.Mode.TUNNEL, REQID, *OUTER)
    return [
        base.PolicySpec(base.Selector(*selector(i)), base.Direction.OUT, templates=(template,))
        for i in range(n)
    ]


def sas(n: int) -> list[base.SaSpec]:
    return [
        base.SaSpec(
            src=OUTER[0],
            dst=OUTER[1],
            proto=base.IpsecProto.ESP,
            spi=0x10000 + i,
            mode=base.Mode.TUNNEL,
            reqid=REQID,
            enc_alg="aes-gcm-16",
            enc_key=secrets.token_bytes(20),
            esn=False,
        )
        for i in range(n)
    ]


def batch_lines(pols, sa_list) -> tuple[str, str]:
    p_lines = "".join(
        f"xfrm policy add src {p.selector.src} dst {p.selector.dst} dir out "
        f"tmpl src {OUTER[0]} dst {OUTER[1]} proto esp reqid {REQID} mode tunnel\n"
        for p in pols
    )
    s_lines = "".join(
        f"xfrm state add src {s.src} dst {s.dst} proto esp spi {s.spi:#x} reqid {REQID} "
        f"mode tunnel aead 'rfc4106(gcm(aes))' 0x{s.enc_key.hex()} 128\n"
        for s in sa_list
    )
    return p_lines, s_lines


def namespace(tag: str) -> str:
    name = f"kwbx-{tag}-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    return name


def timed_batch(netns: str, lines: str) -> float:
    start = time.perf_counter()
    subprocess.run(["ip", "-n", netns, "-batch", "-"], input=lines, text=True, check=True)
    return time.perf_counter() - start


def compare(what: str, items, install_all, ip_netns: str, ip_lines: str) -> None:
    """Install `items` through Keyway's plane (`install_all`), then the same through
    `ip -batch` in another namespace, and print both rates and their ratio."""
    start = time.perf_counter()
    install_all(items)
    keyway = time.perf_counter() - start
    ip = timed_batch(ip_netns, ip_lines)
    n = len(items)
    print(f"{n} {what}: keyway {n / keyway:,.0f}/s, ip -batch {n / ip:,.0f}/s,"
          f" ratio keyway/ip {ip / keyway:.2f}")  # fmt: skip


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with_sas = not probe_kernel_esp()
    pols, sa_list = policies(n), sas(n) if with_sas else []
    p_lines, s_lines = batch_lines(pols, sa_list)
    names = [namespace("keyway"), namespace("batch"), namespace("ip"), namespace("ip2")]
    try:
        plane, batch_plane = KernelPlane(netns=names[0]), KernelPlane(netns=names[1])

        def one_by_one(items, install):
            for item in items:
                install(item)

        def batched(items):
            failed = batch_plane.install_policies(items)
            assert not failed, failed[:3]

        compare(
            "XFRM policies one by one (install_policy)",
            pols,
            lambda items: one_by_one(items, plane.install_policy),
            names[2],
            p_lines,
        )
        compare("XFRM policies in batches (install_policies)", pols, batched, names[3], p_lines)
        if with_sas:
            compare("ESP SAs", sa_list, lambda items: one_by_one(items, plane.install_sa),
                    names[2], s_lines)  # fmt: skip
        else:
            print("ESP SAs: this kernel refuses them (run in the VM tier for SA figures)")
    finally:
        for name in names:
            subprocess.run(["ip", "netns", "del", name], check=False)


if __name__ == "__main__":
    main()
