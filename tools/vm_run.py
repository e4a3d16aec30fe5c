#!/usr/bin/env python3
"""Run a command inside the real-kernel VM tier and return its exit code.

Usage: tools/vm_run.py [--timeout S] -- COMMAND...   (run from the checkout)

The guest boots Debian's stock kernel (tools/vm-setup.sh unpacks it) under qemu/TCG via
virtme-ng, with this machine's root filesystem shared read-only over 9p, so it runs the
checkout's own .venv. Facts behind the choices are in ../shared/notes/vm-tier.md:
KVM does not work here (always --disable-kvm); the guest gets no environment, so a
script sets it; qemu truncates its output files, so it gets pipes; only the --rwdir
folder is writable and survives; a guest that dies returns no exit code of its own, so
the command's code is read back from a file it writes, and its absence is a failure.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "vm"
# The emulated CPU advertises svm: keep kvm modules from loading (saves seconds).
# (cache=loose on the 9p root would speed imports 2-3x, but virtme-ng-init mounts the
# root itself with fixed options and a 9p channel cannot be mounted twice.)
KERNEL_ARGS = ["modprobe.blacklist=kvm,kvm_amd,kvm_intel"]
PASSED_ENV = ("CI", "KEYWAY_LAB_HOSTS", "PYTEST_ADDOPTS")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--memory", default="2G")
    parser.add_argument("--cpus", default="2")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("no command given")
    ready = CACHE / "kernel" / ".ready"
    if not ready.exists():
        print("vm-run: the VM tier is not set up: run tools/vm-setup.sh", file=sys.stderr)
        return 2
    kernel = CACHE / "kernel" / "boot" / f"vmlinuz-{ready.read_text().strip()}"

    rwdir = Path(tempfile.mkdtemp(prefix="keyway-vm-"))
    script = rwdir / "guest.sh"
    env_lines = [f"export {k}={shlex.quote(os.environ[k])}" for k in PASSED_ENV if k in os.environ]
    script.write_text(
        "#!/bin/sh\n"
        f"export PATH={shlex.quote(str(ROOT / '.venv/bin'))}:/usr/sbin:/usr/bin:/sbin:/bin\n"
        f"export VIRTUAL_ENV={shlex.quote(str(ROOT / '.venv'))}\n"
        "export KEYWAY_IN_VM=1 PYTHONDONTWRITEBYTECODE=1 HOME=/tmp\n"
        f"export KEYWAY_VM_RWDIR={shlex.quote(str(rwdir))}\n"
        + "\n".join(env_lines)
        + f"\ncd {shlex.quote(str(ROOT))}\n"
        + shlex.join(command)
        + f"\necho $? > {shlex.quote(str(rwdir / 'rc'))}\n"
    )
    script.chmod(0o755)
    vng = [
        str(CACHE / "vng/bin/vng"),
        "--run",
        str(kernel),
        "--disable-kvm",
        "--memory",
        args.memory,
        "--cpus",
        args.cpus,
        "--rwdir",
        str(rwdir),
        *(a for arg in KERNEL_ARGS for a in ("--append", arg)),
        "--exec",
        str(script),
    ]
    env = {**os.environ, "PATH": f"{CACHE / 'vng/bin'}:{os.environ.get('PATH', '')}"}
    started = time.monotonic()
    proc = subprocess.Popen(
        vng,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    try:
        for line in proc.stdout:
            sys.stdout.buffer.write(line)
            sys.stdout.flush()
            if time.monotonic() - started > args.timeout:
                raise TimeoutError
        proc.wait(timeout=max(1.0, args.timeout - (time.monotonic() - started)))
    except (TimeoutError, subprocess.TimeoutExpired):
        os.killpg(proc.pid, signal.SIGKILL)  # qemu too: it is in the session's group
        proc.wait()
        print(f"vm-run: timed out after {args.timeout:.0f}s", file=sys.stderr)
        return 124
    elapsed = time.monotonic() - started
    rc_file = rwdir / "rc"
    if not rc_file.exists():
        print(
            f"vm-run: the guest died before the command finished (vng exit {proc.returncode})",
            file=sys.stderr,
        )
        return 125
    rc = int(rc_file.read_text().strip() or 1)
    print(f"vm-run: command exited {rc} after {elapsed:.0f}s in the VM")
    if rc == 0:
        shutil.rmtree(rwdir, ignore_errors=True)
    else:
        print(f"vm-run: the guest's folder is kept: {rwdir}")
    return rc


if __name__ == "__main__":
    sys.exit(main())
