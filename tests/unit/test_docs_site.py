"""The docs site as Ansible users read it (tools/docs_site.py): it builds without a
warning, every module, plugin and role of the collection has a page, the guide is the
README, and a module's page, rendered by headless Chromium, shows the options table with
the module's real options."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from html.parser import HTMLParser

import pytest

from tests.fixtures.ansible import BIN, ROOT, ansible_env

DOCS_TOOLS = ("antsibull_docs", "sphinx", "sphinx_ansible_theme", "myst_parser")
if not all(importlib.util.find_spec(tool) for tool in DOCS_TOOLS):
    # The min-deps venv holds the runtime packages and the test tools only.
    pytest.skip("the docs extra is not installed (tools/pydeps.py docs)", allow_module_level=True)

from tools.docs_site import Site, build_site


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Site:
    return build_site(tmp_path_factory.mktemp("docs") / "site")


def test_the_site_builds_without_a_warning(site):
    assert site.warnings == []
    assert (site.html / "index.html").is_file()


def _documented() -> list[tuple[str, str]]:
    """(type, name) of every module, plugin and role of the checkout."""
    plugins = ROOT / "plugins"
    found = [("module", p.stem) for p in (plugins / "modules").glob("*.py")]
    # A filter's documentation is its .yml file (one .py holds several filters).
    found += [("filter", p.stem) for p in (plugins / "filter").glob("*.yml")]
    for kind in ("lookup", "connection", "inventory"):
        found += [(kind, p.stem) for p in (plugins / kind).glob("*.py") if p.stem != "__init__"]
    found += [("role", p.name) for p in (ROOT / "roles").iterdir() if p.is_dir()]
    return sorted(found)


def test_every_module_plugin_and_role_has_a_page_linked_from_the_index(site):
    documented = _documented()
    assert {kind for kind, _ in documented} >= {"module", "filter", "lookup", "role"}
    index = (site.html / "index.html").read_text()
    for kind, name in documented:
        page = site.html / f"{name}_{kind}.html"
        assert page.is_file(), (kind, name)
        assert f"keyway.ipsec.{name}" in page.read_text(), page
        assert f'href="{page.name}"' in index, page.name


def test_the_guide_is_the_readme(site):
    guide = (site.html / "docsite/guide.html").read_text()
    headings = [line.lstrip("#").strip() for line in (ROOT / "README.md").read_text().splitlines()
                if line.startswith("## ")]  # fmt: skip
    assert headings
    for heading in headings:
        assert f">{heading}<" in guide.replace("&quot;", '"'), heading
    assert 'href="docsite/guide.html"' in (site.html / "index.html").read_text()


class _OptionsTable(HTMLParser):
    """The options of a module page's Parameters section, as its table shows them:
    each row's anchor (the option's path, parent/child) and the name shown in bold."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[tuple[str, str]] = []
        self.tables = 0
        self._section: list[str | None] = []
        self._anchor: str | None = None
        self._in_title = self._in_name = False

    @property
    def _in_parameters(self) -> bool:
        return "parameters" in self._section

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attr = dict(attrs)
        classes = (attr.get("class") or "").split()
        if tag == "section":
            self._section.append(attr.get("id"))
        elif not self._in_parameters:
            return
        elif tag == "table" and "ansible-option-table" in classes:
            self.tables += 1
        elif "ansibleOptionAnchor" in classes and (attr.get("id") or "").startswith("parameter-"):
            self._anchor = attr["id"].removeprefix("parameter-")
        elif tag == "p" and "ansible-option-title" in classes:
            self._in_title = True
        elif tag == "strong" and self._in_title:
            self._in_name = True

    def handle_endtag(self, tag: str) -> None:
        if tag == "section":
            self._section.pop()
        elif tag == "p":
            self._in_title = False
        elif tag == "strong":
            self._in_name = False

    def handle_data(self, data: str) -> None:
        if self._in_name and self._anchor is not None:
            self.rows.append((self._anchor, data))
            self._anchor = None


def _option_paths(options: dict, parent: str = "") -> set[str]:
    paths = set()
    for name, spec in options.items():
        paths.add(f"{parent}{name}")
        paths |= _option_paths(spec.get("suboptions") or {}, f"{parent}{name}/")
    return paths


@pytest.mark.parametrize("module", ["xfrm_state", "tunnel"])
def test_a_module_page_in_chromium_shows_the_module_options(site, module, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("chromium is not installed (Debian package chromium)")
    # The options as ansible-doc reads them: the module's DOCUMENTATION with its
    # fragments (tunnel's come from keyway.ipsec.agent).
    doc = subprocess.run(
        [str(BIN / "ansible-doc"), "-j", "-t", "module", f"keyway.ipsec.{module}"],
        capture_output=True,
        text=True,
        env=ansible_env(),
        check=True,
    )
    options = json.loads(doc.stdout)[f"keyway.ipsec.{module}"]["doc"]["options"]
    expected = _option_paths(options)
    assert len(options) >= 3

    page = site.html / f"{module}_module.html"
    # Root runs Chromium only without its sandbox; a profile of the test's own, and none of
    # Chromium's own connections (this machine reaches no network).
    dom = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
         "--no-first-run", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", f"--user-data-dir={tmp_path}", "--dump-dom", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout  # fmt: skip
    table = _OptionsTable()
    table.feed(dom)
    assert table.tables >= 1, "no options table in the Parameters section"
    assert {path for path, _ in table.rows} == expected
    assert all(path.rsplit("/", 1)[-1] == name for path, name in table.rows), table.rows
