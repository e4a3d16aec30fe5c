#!/usr/bin/env python3
"""The collection's docs site, as Ansible users read collection docs: antsibull-docs
writes a page for every module, plugin and role, and the guide (docs/docsite: the
README), into a Sphinx tree that Sphinx builds to HTML with warnings as errors.

    tools/docs_site.py [DEST]   (default build/docs; the HTML goes to DEST/html)

The collection documented is the tarball `make build` makes (tracked files only), as
ansible-galaxy installs it; antsibull-docs' linter checks the checkout first. Nothing is
fetched: Sphinx would download Ansible's own inventory of link targets, so the targets in
Ansible's docs that the pages link to (ANSIBLE_DOCS, and ansible.builtin's plugin pages)
go into a local one. Exits 1 if any step fails or warns.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml

from tools.build_collection import build

GALAXY = yaml.safe_load((ROOT / "galaxy.yml").read_text())
COLLECTION = f"{GALAXY['namespace']}.{GALAXY['name']}"
BIN = Path(sys.executable).parent
# Targets in Ansible's documentation that antsibull-docs' pages link to, besides the
# pages of ansible.builtin's modules and plugins (_builtin_targets), as (name, domain:role,
# URI relative to ANSIBLE_DOCS_URL, title). A link to any other is a Sphinx warning
# (nitpicky), so the build says when this list needs a line.
ANSIBLE_DOCS_URL = "https://docs.ansible.com/projects/ansible/devel/"
ANSIBLE_DOCS = [
    ("common_return_values", "std:label", "reference_appendices/common_return_values.html"
     "#common-return-values", "Return Values"),
    ("ansible_configuration_settings", "std:label", "reference_appendices/config.html"
     "#ansible-configuration-settings", "Ansible Configuration Settings"),
    ("ANSIBLE_PIPELINING", "std:envvar", "reference_appendices/config.html"
     "#envvar-ANSIBLE_PIPELINING", "-"),
]  # fmt: skip
BUILTIN_PLUGIN_TYPES = ("become", "cache", "callback", "cliconf", "connection", "filter",
                        "httpapi", "inventory", "lookup", "netconf", "shell", "strategy",
                        "test", "vars")  # fmt: skip
# Appended to the conf.py that `antsibull-docs sphinx-init` writes.
CONF = """
# tools/docs_site.py: Ansible's link targets from a local inventory (nothing fetched);
# Markdown for the guide, which is the README.
intersphinx_mapping = {{"ansible_devel": ({url!r}, {inventory!r})}}
extensions.append("myst_parser")
exclude_patterns = ["docsite/README.md"]  # included by the guide page, not a page itself
"""
# The generated guide page: the README, parsed as Markdown (literal blocks are shown as
# they are: its indented blocks are diagrams, not YAML).
GUIDE = """\
.. _ansible_collections.{collection}.docsite.guide:

.. highlight:: none

.. include:: {readme}
   :parser: myst_parser.sphinx_
"""


@dataclass
class Site:
    html: Path
    warnings: list[str]


def _env(collections: Path) -> dict[str, str]:
    """The installed collection and nothing of the checkout (make exports its
    collections path); antsibull-docs runs this venv's ansible and ansible-doc."""
    env = {k: v for k, v in os.environ.items()
           if k != "PYTHONPATH" and not k.startswith("ANSIBLE_")}  # fmt: skip
    env.update(ANSIBLE_COLLECTIONS_PATH=str(collections), PATH=f"{BIN}:{env.get('PATH', '')}")
    return env


def _run(args: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd, check=False)


def _fail(step: str, done: subprocess.CompletedProcess) -> None:
    sys.exit(f"{step} failed ({done.returncode}):\n{done.stdout}{done.stderr}")


def _builtin_targets() -> list[tuple[str, str, str, str]]:
    """The page of each of ansible.builtin's modules and plugins (M(ansible.builtin.package)
    and the like), from the ansible-core installed here."""
    import ansible

    core = Path(ansible.__file__).parent
    found = [("module", p) for p in (core / "modules").glob("*.py")]
    for kind in BUILTIN_PLUGIN_TYPES:
        # A filter or test is documented in its own .yml (one .py holds several).
        suffix = "yml" if kind in ("filter", "test") else "py"
        found += [(kind, p) for p in (core / "plugins" / kind).glob(f"*.{suffix}")]
    return [(f"ansible_collections.ansible.builtin.{p.stem}_{kind}", "std:label",
             f"collections/ansible/builtin/{p.stem}_{kind}.html", f"ansible.builtin.{p.stem}")
            for kind, p in found if not p.stem.startswith("_")]  # fmt: skip


def _inventory(path: Path) -> None:
    """A Sphinx object inventory (version 2) of ANSIBLE_DOCS and ansible.builtin's pages."""
    header = "# Sphinx inventory version 2\n# Project: Ansible\n# Version: devel\n"
    header += "# The remainder of this file is compressed using zlib.\n"
    targets = ANSIBLE_DOCS + _builtin_targets()
    lines = "".join(f"{name} {role} -1 {uri} {title}\n" for name, role, uri, title in targets)
    path.write_bytes(header.encode() + zlib.compress(lines.encode()))


def lint(env: dict[str, str]) -> list[str]:
    """antsibull-docs' linter on the checkout: the extra docs, and every plugin's and
    role's documentation as antsibull-docs renders it."""
    done = _run([str(BIN / "antsibull-docs"), "lint-collection-docs", "--plugin-docs", "."],
                env, ROOT)  # fmt: skip
    return [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]


def build_site(dest: Path) -> Site:
    """The site's Sphinx tree in `dest` and its HTML in `dest`/html; `warnings` holds
    every line the linter, antsibull-docs and Sphinx warned with."""
    if dest.exists():
        shutil.rmtree(dest)
    # antsibull-docs writes only into folders no one else can write to.
    dest.mkdir(mode=0o700, parents=True)
    with tempfile.TemporaryDirectory(prefix="keyway-docs-") as tmp:
        installed = Path(tmp) / "installed"
        env = _env(installed)
        warnings = lint(env)
        tarball = build(Path(tmp) / "dist")
        done = _run([str(BIN / "ansible-galaxy"), "collection", "install", "--force", "-p",
                     str(installed), str(tarball)], env, Path(tmp))  # fmt: skip
        if done.returncode:
            _fail("ansible-galaxy collection install", done)
        collection = installed / "ansible_collections" / COLLECTION.replace(".", "/")

        done = _run([str(BIN / "antsibull-docs"), "sphinx-init", "--use-current",
                     "--squash-hierarchy", "--fail-on-error", "--no-add-antsibull-docs-version",
                     "--project", COLLECTION, "--title", COLLECTION, "--html-short-title",
                     COLLECTION, "--copyright", ", ".join(GALAXY["authors"]),
                     "--dest-dir", str(dest), COLLECTION], env, dest)  # fmt: skip
        if done.returncode:
            _fail("antsibull-docs sphinx-init", done)
        # Its build script and requirements would build the site without the steps below.
        (dest / "build.sh").unlink()
        (dest / "requirements.txt").unlink()
        _inventory(dest / "ansible_devel.inv")
        with (dest / "conf.py").open("a") as conf:
            conf.write(CONF.format(url=ANSIBLE_DOCS_URL, inventory=str(dest / "ansible_devel.inv")))

        rst = dest / "rst"
        done = _run([str(BIN / "antsibull-docs"), "--config-file", "antsibull-docs.cfg",
                     "collection", "--use-current", "--squash-hierarchy", "--fail-on-error",
                     "--cleanup", "everything", "--dest-dir", str(rst), COLLECTION],
                    env, dest)  # fmt: skip
        if done.returncode:
            _fail("antsibull-docs collection", done)
        warnings += [line for line in done.stderr.splitlines()
                     if "WARNING" in line or "ERROR" in line]  # fmt: skip

        # The guide page is the README; its picture goes where its link points, next to it.
        guide = rst / "docsite" / "guide.rst"
        readme = guide.parent / "README.md"
        shutil.copy(collection / "README.md", readme)
        shutil.copytree(collection / "docs", guide.parent / "docs",
                        ignore=shutil.ignore_patterns("docsite"))  # fmt: skip
        guide.write_text(GUIDE.format(collection=COLLECTION, readme=readme.name))

        log = dest / "sphinx-warnings.txt"
        done = _run([str(BIN / "sphinx-build"), "-b", "html", "-c", str(dest), "-W",
                     "--keep-going", "-q", "-w", str(log), str(rst), str(dest / "html")],
                    env, dest)  # fmt: skip
        warnings += log.read_text().splitlines() if log.exists() else []
        if done.returncode and not warnings:
            _fail("sphinx-build", done)
    return Site(html=dest / "html", warnings=warnings)


def main() -> int:
    site = build_site(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else ROOT / "build/docs")
    for line in site.warnings:
        print(line, file=sys.stderr)
    if site.warnings:
        return 1
    print(site.html / "index.html")
    return 0


if __name__ == "__main__":
    sys.exit(main())
