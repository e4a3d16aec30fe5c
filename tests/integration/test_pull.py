"""GitOps by pull: a lab host converges itself with ansible-pull from a git repository
holding the inventory (its master secret vaulted) and the playbooks, and ends where a
push run would have put it."""

from __future__ import annotations

import re
import shutil
import subprocess

from tests.fixtures.ansible import BIN, ROOT, ansible_env, recap, run_playbook
from tests.fixtures.netns import in_netns, udp_exchange

VAULT_PASSWORD = "lab-vault-password-for-the-pull-test"
MASTER_SECRET = "pulled-master-secret-0123456789-abcdefghijklmnop"


def make_repo(tmp_path):
    """A git repository with the lab's inventory and playbooks, the secret vaulted."""
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "inventory", repo / "inventory")
    shutil.copytree(ROOT / "playbooks", repo / "playbooks")
    password = tmp_path / "vault.pass"
    password.write_text(VAULT_PASSWORD)
    password.chmod(0o600)
    vaulted = subprocess.run(
        [str(BIN / "ansible-vault"), "encrypt_string", "--vault-password-file", str(password),
         "--name", "keyway_master_secret", MASTER_SECRET],
        capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lab_vars = repo / "inventory/lab/group_vars/lab.yml"
    text = re.sub(
        r"^keyway_master_secret:.*?\n(?=\S)", vaulted, lab_vars.read_text(), flags=re.S | re.M
    )
    assert "$ANSIBLE_VAULT" in text
    lab_vars.write_text(text)
    for argv in (["init", "-q"], ["add", "."], ["-c", "user.name=t", "-c", "user.email=t@t",
                                                "commit", "-q", "-m", "lab"]):  # fmt: skip
        subprocess.run(["git", "-C", str(repo), *argv], check=True)
    return repo, password


def test_ansible_pull_on_a_host_converges_it_like_a_push(netns_hosts, tmp_path):
    plan = netns_hosts(3)
    h1, h2, _ = plan.hosts
    repo, password = make_repo(tmp_path)
    vault = f"--vault-password-file={password}"
    pushed = run_playbook("playbooks/site.yml", plan, vault, "--limit", "h2,h3", project=repo)
    assert all(s["failures"] == 0 for s in recap(pushed).values())

    def pull() -> subprocess.CompletedProcess:
        return in_netns(
            h1.netns, str(BIN / "ansible-pull"), "-U", f"file://{repo}", "-d",
            str(tmp_path / "checkout"), "-i", "inventory/lab", vault, "--limit", "h1",
            "playbooks/site.yml",
            env=ansible_env(plan, PATH=f"{BIN}:/usr/sbin:/usr/bin:/sbin:/bin"), timeout=600,
            cwd=tmp_path,  # as on a host: no inventory here before the checkout
        )  # fmt: skip

    first = pull()
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-2000:]
    assert re.search(r"^h1\s+: ok=\d+\s+changed=[1-9]", first.stdout, re.M), first.stdout[-2000:]
    assert udp_exchange(h1.netns, h2.netns, h1.site4_address, h2.site4_address, b"pull") == (
        b"llup"
    )
    again = pull()
    assert re.search(r"^h1\s+: ok=\d+\s+changed=0\s+unreachable=0\s+failed=0", again.stdout, re.M)
    # A push run would change nothing on the pulled host: both computed the same.
    checked = run_playbook(
        "playbooks/site.yml", plan, vault, "--limit", "h1", "--check", "--diff", project=repo
    )
    assert recap(checked)["h1"]["changed"] == 0
