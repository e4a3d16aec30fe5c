#!/usr/bin/python
# Copyright: Keyway developers
# GNU General Public License v3.0+ (see https://www.gnu.org/licenses/gpl-3.0.txt)
"""Write keywayd's configuration, validated by the agent's own parser, and reload it."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: agent_config
short_description: Write keywayd's configuration and make the running agent reload it
description:
  - Renders C(connections) and agent settings into keywayd's YAML config at O(path),
    writing each PSK to its own 0600 file under O(secrets_dir) (the config file then
    holds no secret and can be shown in a diff).
  - The candidate is validated with the same parser keywayd uses before anything is
    written; an invalid configuration fails the task and leaves the host untouched.
  - Files are replaced atomically, mode 0600. When something changed and keywayd
    answers on its control socket, it is asked to reload; unchanged connections keep
    their SAs.
version_added: "0.1.0"
author: Keyway developers (@keyway)
options:
  path:
    description: The config file to write.
    type: path
    required: true
  connections:
    description:
      - keywayd connections by name (see keywayd's config format), without PSKs.
      - Required with O(state=present).
    type: dict
  psks:
    description:
      - PSK of each PSK-authenticated connection, by connection name.
      - During a rotation, a list of PSKs, newest first; keywayd sends the newest and
        still accepts the others from peers that have not rotated yet.
    type: dict
    default: {}
  secrets_dir:
    description: Folder for the PSK files (0700); default C(secrets) beside O(path).
    type: path
  pki:
    description:
      - For connections that authenticate with certificates (C(auth) set to C(pubkey) without
        their own C(certs)), the host's key and certificate, the CA, and its CRL.
      - The certificate, CA and CRL are written under C(pki) beside O(path), each in a
        file named after its content, and those connections name them (with the key
        as their C(key), and the CA and CRL to verify the peer); a renewed certificate
        or a new CRL is a changed connection, reauthenticated make-before-break.
    type: dict
    suboptions:
      key:
        description: The private key file (from M(keyway.ipsec.pki_key)).
        type: path
        required: true
      certificate:
        description: The host's certificate, PEM (from M(keyway.ipsec.pki_ca)).
        type: str
        required: true
      ca:
        description: The CA's certificate, PEM.
        type: str
        required: true
      crl:
        description: The CA's CRL, PEM.
        type: str
  settings:
    description: Top-level agent settings (dataplane, log_level, control_socket, ...).
    type: dict
    default: {}
  state:
    description:
      - C(present) writes the config and PSK files; C(absent) removes them, the secrets
        folder, the C(pki) folder (the key included), and the config's folder when
        nothing else is left in it.
    type: str
    choices: [present, absent]
    default: present
  reload:
    description: Ask a running keywayd to reload when the config changed.
    type: bool
    default: true
  peers_outside_run:
    description:
      - Connections whose other end this run does not converge (a C(--limit) run), by
        name, with that end's name. A connection created or changed here warns that it
        runs on the other end's old settings until that end converges.
    type: dict
    default: {}
extends_documentation_fragment:
  - keyway.ipsec.attributes
attributes:
  check_mode:
    support: full
  diff_mode:
    support: full
    details: The config file's before and after; PSKs live in their own files and never show.
"""

EXAMPLES = r"""
- name: Keyway's tunnels for this host
  keyway.ipsec.agent_config:
    path: /etc/keyway/keywayd.yml
    settings:
      dataplane: auto
    connections: "{{ tunnels_intent.hosts[inventory_hostname].connections }}"
    psks: "{{ tunnels_intent.hosts[inventory_hostname].psk_refs
      | keyway.ipsec.intent_psks(keyway_master_secret) }}"
"""

RETURN = r"""
connections:
  description: Names of the connections in the written config.
  returned: always
  type: list
  elements: str
waiting_for_peers:
  description: Created or changed connections whose other end is outside this run, with it.
  returned: always
  type: dict
secrets_changed:
  description: Connections whose PSK files change (names only), and stale PSK files.
  returned: always
  type: list
  elements: str
plan:
  description:
    - Each connection of the old and the new config by what this run does to it, also
      in check mode. C(changed) connections are reauthenticated make-before-break by a
      running keywayd; C(psk_only) lists changed connections whose settings stay and
      only whose PSKs change.
  returned: always
  type: dict
  contains:
    created:
      description: Connections that are new.
      type: list
      elements: str
    changed:
      description: Connections whose settings or PSKs change.
      type: list
      elements: str
    psk_only:
      description: Changed connections whose only change is their PSKs.
      type: list
      elements: str
    removed:
      description: Connections that go.
      type: list
      elements: str
    unchanged:
      description: Connections left as they are.
      type: list
      elements: str
    links:
      description: Each connection with what happens to it, in words.
      type: dict
reload:
  description: keywayd's answer to the reload (connections added, removed, changed, unchanged).
  returned: when a running keywayd was asked to reload
  type: dict
systemd:
  description:
    - Whether systemd is the host's init (C(/run/systemd/system) exists, as sd_booted() checks).
  returned: with O(state=present)
  type: bool
psk_state:
  description:
    - For each PSK-authenticated connection, after this task (in check mode, as it is
      now), C(held), how many PSK files the host holds for it (two during a rotation),
      and C(current), whether the PSK it sends already is the newest of O(psks).
      Booleans and counts only, never a PSK. C(playbooks/rekey.yml) retires a previous
      PSK only when every end of the link is C(current).
  returned: with O(state=present)
  type: dict
agent:
  description:
    - The keywayd answering on the control socket, if any, after this task.
  returned: with O(state=present)
  type: dict
  contains:
    running:
      description: A keywayd answers on the control socket.
      type: bool
    pid:
      description: Its process ID.
      type: int
      returned: when running
    config:
      description: The config file it runs from.
      type: str
      returned: when running
    library:
      description:
        - The fingerprint of the library it runs (SHA-256 over its files); the role
          keyway.ipsec.agent compares it with the lookup P(keyway.ipsec.agent_library#lookup)
          and skips M(keyway.ipsec.keywayd) when they are equal.
      type: str
      returned: when running
"""

import hashlib
import os
import tempfile
from pathlib import Path

from ansible.module_utils.basic import AnsibleModule

from ansible_collections.keyway.ipsec.plugins.module_utils.agent.config import (
    ConfigError,
    config_warnings,
    parse_config,
)
from ansible_collections.keyway.ipsec.plugins.module_utils.agent.control import (
    DEFAULT_SOCKET,
    ControlError,
    request,
)

try:
    import yaml

    HAS_YAML = True
    # libyaml's, where PyYAML has it: a config of hundreds of connections is read and
    # written on every run.
    SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    SafeDumper = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
except ImportError:  # pragma: no cover
    HAS_YAML = False


def _psk_file_entry(files: list[str]) -> str | list[str]:
    """A connection's psk_file in the config: one file, or a rotation's list."""
    return files[0] if len(files) == 1 else files


def render(settings: dict, connections: dict, psk_files: dict[str, list[str]]) -> str:
    document = dict(sorted(settings.items()))
    conns = {}
    for name in sorted(connections):
        conn = dict(connections[name])
        conn.pop("psk", None)
        if name in psk_files:
            conn["psk_file"] = _psk_file_entry(psk_files[name])
        conns[name] = conn
    document["connections"] = conns
    header = "# Written by keyway.ipsec.agent_config: edits are replaced on the next run.\n"
    return header + yaml.dump(document, Dumper=SafeDumper, sort_keys=True, default_flow_style=False)


def plan(
    before: str | None,
    connections: dict,
    secrets_changed: list[str],
    psk_files: dict[str, list[str]],
) -> dict:
    """What this run does to each connection, from the file as it is and the new one.
    Its PSKs change when their contents do (compared, never shown) or when it gains or
    retires one (a rotation)."""
    old = {}
    if before:
        try:
            old = (yaml.load(before, Loader=SafeLoader) or {}).get("connections") or {}
        except yaml.YAMLError:
            old = {}

    def settings(conn: dict) -> dict:
        return {k: v for k, v in conn.items() if k not in ("psk", "psk_file")}

    new = {name: settings(conn) for name, conn in connections.items()}
    both = new.keys() & old.keys()
    settings_changed = {n for n in both if settings(old[n]) != new[n]}
    keys_changed = {
        n
        for n in both
        if n in secrets_changed
        or old[n].get("psk_file") != (_psk_file_entry(psk_files[n]) if n in psk_files else None)
    }
    result = {
        "created": sorted(new.keys() - old.keys()),
        "changed": sorted(settings_changed | keys_changed),
        "psk_only": sorted(keys_changed - settings_changed),
        "removed": sorted(old.keys() - new.keys()),
        "unchanged": sorted(both - settings_changed - keys_changed),
    }
    result["links"] = {
        name: status
        for status in ("created", "changed", "removed", "unchanged")
        for name in result[status]
    }
    for name in result["changed"]:
        how = "PSK only" if name in result["psk_only"] else "settings"
        result["links"][name] = f"changed ({how}): reauthenticated make-before-break"
    return dict(sorted(result.items()))


PKI_PREFIXES = ("cert", "ca", "crl")


def _is_pki_file(path: Path) -> bool:
    """A certificate, CA or CRL this module wrote (PREFIX-HASH.pem)."""
    prefix, dash, rest = path.name.partition("-")
    return prefix in PKI_PREFIXES and bool(dash) and rest.endswith(".pem")


def with_pki(
    connections: dict, pki_dir: Path, pki_params: dict | None, check: bool = False
) -> tuple[dict, dict]:
    """The connections with certificate files filled in, and those files' contents by
    path. A connection on certificates (auth pubkey) without its own certs uses the
    host's certificate and key, and verifies its peer with the CA (and its CRL). In
    check mode a host without a key yet has no certificate either: its connections are
    planned with files still to come."""
    files: dict[Path, bytes] = {}
    if check and not pki_params:
        pending = {p: str(pki_dir / f"{p}-pending.pem") for p in PKI_PREFIXES}
        pki_params, by_prefix = {"key": str(pki_dir / "key.pem")}, pending
    else:
        by_prefix = {}
    if pki_params:
        for prefix, field in (("cert", "certificate"), ("ca", "ca"), ("crl", "crl")):
            if pki_params.get(field):
                pem = pki_params[field].encode()
                digest = hashlib.sha256(pem).hexdigest()[:16]
                files[pki_dir / f"{prefix}-{digest}.pem"] = pem
    by_prefix.update({path.name.partition("-")[0]: str(path) for path in files})
    result = {}
    for name, conn in connections.items():
        local, remote = conn.get("local") or {}, conn.get("remote") or {}
        if local.get("auth") != "pubkey" or "certs" in local:
            result[name] = conn
            continue
        if not pki_params:
            raise ValueError(
                f"connection {name} authenticates with certificates (auth pubkey) and has "
                "no certs: give pki (the host's key and certificate, the CA)"
            )
        local = {**local, "certs": [by_prefix["cert"]], "key": pki_params["key"]}
        remote = dict(remote)
        remote.setdefault("cacerts", [by_prefix["ca"]])
        if "crl" in by_prefix:
            remote.setdefault("crls", [by_prefix["crl"]])
        result[name] = {**conn, "local": local, "remote": remote}
    return result, files


def _is_psk_file(path: Path) -> bool:
    """NAME.psk (the PSK sent) or NAME.psk-N (older ones still accepted)."""
    return path.name.endswith(".psk") or ".psk-" in path.name


def remove(path: Path, secrets_dir: Path, pki_dir: Path, check: bool) -> dict:
    """The config, the PSK files, the certificates and key, and their folders gone; the
    config's folder too when nothing else is left in it."""
    files = [path] if path.exists() else []
    if secrets_dir.is_dir():
        files += sorted(p for p in secrets_dir.iterdir() if _is_psk_file(p))
    if pki_dir.is_dir():
        files += sorted(p for p in pki_dir.iterdir() if p.name.endswith(".pem"))
    folders = [d for d in (secrets_dir, pki_dir) if d.is_dir()]
    result = {"changed": bool(files) or bool(folders), "removed": [str(f) for f in files]}
    if check:
        return result
    for file in files:
        file.unlink()
    for folder in (secrets_dir, pki_dir, path.parent):
        try:
            folder.rmdir()
        except OSError:
            continue  # absent, or something else lives there
        result["removed"].append(str(folder))
    return result


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _write_private(path: Path, text: str) -> None:
    """Atomically replace `path` with `text`, born 0600 (no window where others read)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as handle:
            os.fchmod(handle.fileno(), 0o600)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def agent_state(socket_path: str) -> dict:
    """The keywayd on `socket_path`, if one answers: its PID, config and library."""
    try:
        status = request(socket_path, "status", timeout=5)
    except (ControlError, OSError):
        return {"running": False}
    return {"running": True, **{k: status.get(k) for k in ("pid", "config", "library")}}


def main() -> None:
    module = AnsibleModule(
        argument_spec=dict(
            path=dict(type="path", required=True),
            connections=dict(type="dict"),
            psks=dict(type="dict", default={}, no_log=True),
            secrets_dir=dict(type="path"),
            settings=dict(type="dict", default={}),
            pki=dict(
                type="dict",
                options=dict(
                    key=dict(type="path", required=True, no_log=False),
                    certificate=dict(type="str", required=True),
                    ca=dict(type="str", required=True),
                    crl=dict(type="str"),
                ),
            ),
            reload=dict(type="bool", default=True),
            state=dict(type="str", choices=["present", "absent"], default="present"),
            peers_outside_run=dict(type="dict", default={}),
        ),
        supports_check_mode=True,
    )
    if not HAS_YAML:
        module.fail_json(msg="PyYAML is required on the host")
    path = Path(module.params["path"])
    secrets_dir = Path(module.params["secrets_dir"] or path.parent / "secrets")
    pki_dir = path.parent / "pki"
    if module.params["state"] == "absent":
        module.exit_json(**remove(path, secrets_dir, pki_dir, module.check_mode))
    if module.params["connections"] is None:
        module.fail_json(msg="connections is required with state present")
    settings = module.params["settings"]
    try:
        connections, pki_files = with_pki(
            module.params["connections"], pki_dir, module.params["pki"], module.check_mode
        )
    except ValueError as exc:
        module.fail_json(msg=str(exc))
    # One PSK, or a rotation's list (newest first), as strings.
    psks = {
        name: [str(v) for v in value] if isinstance(value, list) else [str(value)]
        for name, value in module.params["psks"].items()
    }
    unknown = sorted(set(psks) - set(connections))
    if unknown:
        module.fail_json(msg=f"psks for connections that do not exist: {', '.join(unknown)}")

    # Validate exactly what keywayd will read, with the PSKs inline (same parser).
    candidate = dict(settings)
    candidate["connections"] = {
        name: {**conn, **({"psk": psks[name]} if name in psks else {})}
        for name, conn in connections.items()
    }
    try:
        parsed = parse_config(candidate, source=str(path), file_private=True, base_dir=path.parent)
    except ConfigError as exc:
        module.fail_json(msg=str(exc), problems=[list(p) for p in exc.problems])
    for warning in config_warnings(parsed):
        module.warn(warning)

    # NAME.psk holds the PSK keywayd sends; NAME.psk-1, -2... the older ones it accepts.
    psk_files = {
        name: [str(secrets_dir / (f"{name}.psk" + (f"-{n}" if n else ""))) for n in range(len(v))]
        for name, v in psks.items()
    }
    wanted = {Path(f).name for files in psk_files.values() for f in files}
    text = render(settings, connections, psk_files)
    before = _read(path)
    stale = (
        sorted(p.name for p in secrets_dir.iterdir() if _is_psk_file(p) and p.name not in wanted)
        if secrets_dir.is_dir()
        else []
    )
    secrets_changed = (
        sorted(
            name
            for name, values in psks.items()
            if any(_read(Path(f)) != v for f, v in zip(psk_files[name], values, strict=True))
        )
        + stale
    )
    pki_stale = (
        sorted(p for p in pki_dir.iterdir() if _is_pki_file(p) and p not in pki_files)
        if pki_dir.is_dir()
        else []
    )
    pki_writes = [p for p, pem in pki_files.items() if not p.exists() or p.read_bytes() != pem]
    changed = before != text or bool(secrets_changed) or bool(pki_writes) or bool(pki_stale)
    held = {
        name: sum(Path(f).exists() for f in files) + sum(p.startswith(f"{name}.psk") for p in stale)
        for name, files in psk_files.items()
    }
    result = {
        "changed": changed,
        # what sd_booted() checks: the role runs keywayd from a unit where this holds
        "systemd": os.path.isdir("/run/systemd/system"),
        "psk_state": {
            name: {"held": held[name], "current": _read(Path(files[0])) == psks[name][0]}
            for name, files in psk_files.items()
        },
        "path": str(path),
        "connections": sorted(connections),
        "secrets_changed": secrets_changed,  # names only
        "plan": plan(before, connections, secrets_changed, psk_files),
    }
    outside = module.params["peers_outside_run"]
    waiting = {
        name: outside[name]
        for name in result["plan"]["created"] + result["plan"]["changed"]
        if name in outside
    }
    for name, peer in sorted(waiting.items()):
        module.warn(
            f"{name} changes here, but {peer} is not in this run: until {peer} converges, "
            f"it keeps its old settings for this link (keywayd reauthenticates "
            f"make-before-break; what {peer} refuses or narrows is logged there)"
        )
    result["waiting_for_peers"] = waiting
    if module._diff:
        result["diff"] = {
            "before": before or "",
            "after": text,
            "before_header": str(path),
            "after_header": str(path),
        }
    socket_path = settings.get("control_socket", DEFAULT_SOCKET)
    if not changed or module.check_mode:
        module.exit_json(**result, agent=agent_state(socket_path))

    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    secrets_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(secrets_dir, 0o700)
    for name, values in psks.items():
        for file, value in zip(psk_files[name], values, strict=True):
            if _read(Path(file)) != value:
                _write_private(Path(file), value)
    for name in stale:
        (secrets_dir / name).unlink()
    if pki_files:
        pki_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    for file in pki_writes:  # public: certificates, the CA, the CRL
        _write_private(file, pki_files[file].decode())
        os.chmod(file, 0o644)
    for file in pki_stale:
        file.unlink()
    if before != text:
        _write_private(path, text)
    result["psk_state"] = {name: {"held": len(v), "current": True} for name, v in psks.items()}
    if module.params["reload"] and os.path.exists(socket_path):
        try:
            result["reload"] = request(socket_path, "reload")
        except ControlError as exc:
            module.fail_json(msg=f"written, but keywayd refused to reload: {exc}", **result)
    module.exit_json(**result, agent=agent_state(socket_path))


if __name__ == "__main__":
    main()
