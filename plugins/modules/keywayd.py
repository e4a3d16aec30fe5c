#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Install keywayd's Python package on the host and run it without systemd."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: keywayd
short_description: Install keywayd on the host and keep it running (no systemd)
description:
  - Installs keywayd's library under O(lib_dir), copied from this module's own payload
    (the collection's C(plugins/module_utils), the one source of truth), file by file
    and only where the content differs.
  - Runs keywayd in the foreground mode as a detached process with its log in
    O(log_file) and its PID in O(pid_file), for hosts without systemd (the netns lab,
    containers). A running keywayd whose library changed is restarted.
  - With O(wait), waits until every connection that has a child with
    C(start_action=start) is established, failing with keywayd's reason otherwise.
version_added: "0.1.0"
author: Keyway developers (@keyway)
options:
  state:
    description:
      - C(started) (installed and running), C(stopped), C(restarted).
      - C(installed) only installs the library (systemd hosts run keywayd from its unit).
      - C(absent) stops keywayd (which tells its peers and removes every SA, policy,
        route, rule and device it made) and removes its library, PID file, log, control
        socket and lock, then the run folder and the library's parent when empty.
    type: str
    choices: [started, stopped, restarted, installed, absent]
    default: started
  config:
    description: keywayd's config file (see M(keyway.ipsec.agent_config)).
    type: path
    required: true
  lib_dir:
    description: Where keywayd's Python package is installed.
    type: path
    default: /usr/local/lib/keyway
  run_dir:
    description: Folder of the PID file and the log when not given explicitly.
    type: path
    default: /run/keyway
  pid_file:
    description: keywayd's PID file; default C(keywayd.pid) in O(run_dir).
    type: path
  log_file:
    description: keywayd's log (stderr); default C(keywayd.log) in O(run_dir).
    type: path
  python:
    description:
      - The interpreter that runs keywayd; default the one running this module.
      - Before it installs or starts keywayd, the module asks this interpreter for its
        version and for keywayd's packages (cryptography, pyroute2, PyYAML) and fails,
        naming each one missing or too old, when it lacks any; nothing is changed then.
    type: path
  wait:
    description: Seconds to wait for the C(start) connections to be established (0 = do not wait).
    type: int
    default: 30
  ready_timeout:
    description:
      - Seconds a keywayd just started has to answer on its control socket before the
        module fails with the end of its log (more on a slow or emulated CPU).
    type: int
    default: 30
extends_documentation_fragment:
  - keyway.ipsec.attributes
attributes:
  check_mode:
    support: full
    details: Reports the library files it would write and whether it would start or restart keywayd.
  diff_mode:
    support: none
"""

EXAMPLES = r"""
- name: keywayd runs
  keyway.ipsec.keywayd:
    config: /etc/keyway/keywayd.yml
    lib_dir: /usr/local/lib/keyway
    wait: 30
"""

RETURN = r"""
pid:
  description: keywayd's process ID.
  returned: when running
  type: int
installed:
  description: Library files written (paths relative to O(lib_dir)).
  returned: always
  type: list
  elements: str
missing:
  description: What the interpreter lacks to run keywayd, one phrase each.
  returned: on failure, when O(python) cannot run keywayd
  type: list
  elements: str
  sample: ["pyroute2 missing (needs >= 0.7.2)", "cryptography 3.4.8 (needs >= 38.0.4)"]
established:
  description: Connections established when the module returned.
  returned: when O(wait) is set and keywayd runs
  type: list
  elements: str
"""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.config import (
    ConfigError,
    load_config,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.control import (
    ControlError,
    request,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.library import (
    ENTRY,
    PACKAGE,
    payload_files,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.requirements import (
    interpreter_problems,
)


def install(lib_dir: Path, check: bool) -> list[str]:
    """Write the files whose content differs; return their relative paths. Keyway's
    state folder (the library's parent) is made private to root if it is missing."""
    base = lib_dir / PACKAGE.replace(".", "/")
    written = []
    if not lib_dir.parent.exists():
        written.append(f"{lib_dir.parent}/")
        if not check:
            lib_dir.parent.mkdir(mode=0o700, parents=True)
    for rel, data in payload_files():
        target = base / rel
        try:
            if target.read_bytes() == data:
                continue
        except FileNotFoundError:
            pass
        written.append(rel)
        if not check:
            target.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
            tmp = target.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.chmod(tmp, 0o644)
            os.replace(tmp, target)
    return written


def running_pid(pid_file: Path) -> int | None:
    try:
        pid = int(pid_file.read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ValueError):
        return None
    return pid if ENTRY.encode() in cmdline else None  # not a recycled PID


def stop(pid: int, timeout: float = 10.0) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not Path(f"/proc/{pid}").exists():
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def remove(module, pid, config: Path, lib_dir: Path, run_dir: Path, pid_file, log_file) -> dict:
    """Everything this module and keywayd put on the host, gone (state: absent)."""
    socket_path = run_dir / "keywayd.sock"
    # A config that does not load names no other socket.
    with contextlib.suppress(ConfigError, OSError):
        socket_path = Path(load_config(config).control_socket)
    files = [f for f in (pid_file, log_file, socket_path, Path(f"{socket_path}.lock"))
             if f.exists() or f.is_symlink()]  # fmt: skip
    folders = [d for d in (lib_dir,) if d.exists()]
    empty = [d for d in (run_dir, lib_dir.parent) if d.exists()]
    changed = pid is not None or bool(files or folders)
    result = {"changed": changed, "removed": sorted(str(f) for f in files + folders)}
    if module.check_mode:
        return result
    if pid is not None:
        stop(pid, timeout=15.0)  # SIGTERM: Deletes to the peers, its SAs and policies gone
    for file in files:
        file.unlink(missing_ok=True)
    for folder in folders:
        shutil.rmtree(folder)
    for folder in empty:
        with contextlib.suppress(OSError):  # not empty: something else lives there
            folder.rmdir()
            result["removed"].append(str(folder))
            result["changed"] = True
    return result


def start(module, python: str, lib_dir: Path, config: Path, pid_file: Path, log_file: Path):
    log_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid_file.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    env = dict(os.environ, PYTHONPATH=str(lib_dir), PYTHONDONTWRITEBYTECODE="1")
    process = subprocess.Popen(
        [python, "-m", ENTRY, "--config", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=fd,
        stderr=fd,
        env=env,
        cwd="/",
        start_new_session=True,  # outlives this module and its connection
        close_fds=True,
    )
    os.close(fd)
    pid_file.write_text(f"{process.pid}\n")
    return process


def wait_ready(module, process, socket_path: str, log_file: Path, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            tail = log_file.read_text().splitlines()[-5:] if log_file.exists() else []
            module.fail_json(msg=f"keywayd exited with {process.returncode}", log=tail)
        try:
            return request(socket_path, "status", timeout=5)
        except ControlError:
            time.sleep(0.1)
    module.fail_json(msg=f"keywayd did not answer on {socket_path} within {timeout:.0f} s")


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            state=dict(
                type="str",
                choices=["started", "stopped", "restarted", "installed", "absent"],
                default="started",
            ),
            config=dict(type="path", required=True),
            lib_dir=dict(type="path", default="/usr/local/lib/keyway"),
            run_dir=dict(type="path", default="/run/keyway"),
            pid_file=dict(type="path"),
            log_file=dict(type="path"),
            python=dict(type="path"),
            wait=dict(type="int", default=30),
            ready_timeout=dict(type="int", default=30),
        ),
        supports_check_mode=True,
    )
    p = module.params
    run_dir = Path(p["run_dir"])
    pid_file = Path(p["pid_file"] or run_dir / "keywayd.pid")
    log_file = Path(p["log_file"] or run_dir / "keywayd.log")
    lib_dir, config = Path(p["lib_dir"]), Path(p["config"])
    pid = running_pid(pid_file)
    result = {"changed": False, "installed": []}

    if p["state"] == "stopped":
        if pid is not None:
            result["changed"] = True
            if not module.check_mode:
                stop(pid)
        module.exit_json(**result)

    if p["state"] == "absent":
        module.exit_json(**remove(module, pid, config, lib_dir, run_dir, pid_file, log_file))

    if module.check_mode and not config.exists():
        # A first run in check mode: the config task before this one only said it would
        # write the file. Report what would happen without reading it.
        result["installed"] = install(lib_dir, True)
        result["changed"] = p["state"] != "installed" or bool(result["installed"])
        result["msg"] = f"{config} does not exist yet: keywayd would be installed and started"
        module.exit_json(**result)
    try:
        agent_config = load_config(config)
    except ConfigError as exc:
        module.fail_json(msg=str(exc), **result)
    python = p["python"] or sys.executable
    # Only when something would be installed or started: a running keywayd whose library
    # is current has shown that its interpreter works.
    pending = install(lib_dir, True)
    if pid is None or p["state"] == "installed" or pending:
        problems = interpreter_problems(python)
        if problems:
            module.fail_json(msg=f"keywayd cannot run on {python}: {'; '.join(problems)}",
                             missing=problems, **result)  # fmt: skip
    written = pending if module.check_mode or not pending else install(lib_dir, False)
    result["installed"] = written
    if p["state"] == "installed":
        module.exit_json(**{**result, "changed": bool(written)})
    restart = pid is not None and (bool(written) or p["state"] == "restarted")
    if written or restart or pid is None:
        result["changed"] = True
    if module.check_mode:
        module.exit_json(**result)
    process = None
    if restart:
        stop(pid)
        pid = None
    if pid is None:
        process = start(module, python, lib_dir, config, pid_file, log_file)
        pid = process.pid
    result["pid"] = pid
    wait_ready(module, process, agent_config.control_socket, log_file, p["ready_timeout"])
    if p["wait"]:
        wanted = {
            c.name
            for c in agent_config.connections
            if any(child.start_action == "start" for child in c.children)
        }
        deadline = time.monotonic() + p["wait"]
        while True:
            conns = request(agent_config.control_socket, "list-conns")
            up = {c["name"] for c in conns if c["state"] == "established"}
            if wanted <= up or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        result["established"] = sorted(up)
        if not wanted <= up:
            module.fail_json(
                msg=f"not established after {p['wait']} s: {', '.join(sorted(wanted - up))}"
                f" (see {log_file})",
                **result,
            )
    module.exit_json(**result)


if __name__ == "__main__":
    main()
