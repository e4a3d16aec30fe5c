"""Every plugin's documentation parses (ansible-doc shows it) and documents each option
its code accepts."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PYTHON_PLUGINS = sorted(
    p
    for folder in ("modules", "inventory", "connection")
    for p in (ROOT / "plugins" / folder).glob("*.py")
    if p.name != "__init__.py"
)


def doc_strings(path: Path) -> dict[str, str]:
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant):
            for target in node.targets:
                if isinstance(target, ast.Name) and target.id in (
                    "DOCUMENTATION",
                    "EXAMPLES",
                    "RETURN",
                ):
                    found[target.id] = node.value.value
    return found


def _lines(text: str | list) -> list:
    return [text] if isinstance(text, str) else list(text)


@pytest.mark.parametrize("path", PYTHON_PLUGINS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_python_plugin_documentation_parses(path):
    docs = doc_strings(path)
    documentation = yaml.safe_load(docs["DOCUMENTATION"])
    assert documentation["short_description"] and documentation["description"]
    # Text, not a mapping that a stray ': ' made of a line (ansible-doc fails on those).
    assert all(isinstance(line, str) for line in _lines(documentation["description"]))
    assert all(isinstance(line, str) for line in _lines(documentation.get("notes", [])))
    for option, spec in (documentation.get("options") or {}).items():
        assert spec.get("description"), f"{path.name}: option {option} undocumented"
        assert all(isinstance(line, str) for line in _lines(spec["description"])), option
    if path.parent.name == "modules":
        assert yaml.safe_load(docs["EXAMPLES"]) and yaml.safe_load(docs["RETURN"]) is not None


def module_options(path: Path) -> set[str]:
    """The keys of the argument_spec dict literal in the module's main()."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.keyword) and node.arg == "argument_spec":
            return {kw.arg for kw in node.value.keywords}
    raise AssertionError(f"{path.name}: no argument_spec")


@pytest.mark.parametrize(
    "path", [p for p in PYTHON_PLUGINS if p.parent.name == "modules"], ids=lambda p: p.stem
)
def test_every_module_option_is_documented_and_every_documented_one_exists(path):
    docs = yaml.safe_load(doc_strings(path)["DOCUMENTATION"])
    documented = set(docs.get("options") or {})
    for fragment in docs.get("extends_documentation_fragment") or []:
        documented |= set(_fragment(fragment).get("options") or {})
    assert module_options(path) == documented


def _fragment(name: str) -> dict:
    """keyway.ipsec.FILE[.VARIANT]: plugins/doc_fragments/FILE.py's DOCUMENTATION (or
    its VARIANT in capitals), as ansible-doc merges it."""
    namespace, collection, file, *variant = name.split(".")
    assert (namespace, collection) == ("keyway", "ipsec"), f"{name}: not this collection's"
    attribute = variant[0].upper() if variant else "DOCUMENTATION"
    tree = ast.parse((ROOT / "plugins/doc_fragments" / f"{file}.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef)]
    for node in cls.body:
        if isinstance(node, ast.Assign) and node.targets[0].id == attribute:
            return yaml.safe_load(node.value.value)
    raise AssertionError(f"{name}: no {attribute} in the fragment")


@pytest.mark.parametrize(
    "path", sorted((ROOT / "plugins/filter").glob("*.yml")), ids=lambda p: p.stem
)
def test_filter_documentation_parses(path):
    docs = yaml.safe_load(path.read_text())
    assert docs["DOCUMENTATION"]["short_description"] and docs["RETURN"]
