"""Imports run one way and only the integrations name a framework (issue 16's layout).

Read from the source with ``ast``, type-checking imports included: a cycle there is
still two modules that each need the other to be understood.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import usage_callbacks

PACKAGE = Path(usage_callbacks.__file__).parent
FRAMEWORKS = ("langchain", "langgraph", "llama_index")
FRAMEWORK_MODULE = re.compile(r"(langchain_\w+|langgraph|llama_index)(\.\w+)*")
#: Modules that exist to name a framework: the adapters, the import shims, and the demo
#: (an application of the library, run by the CLI).
NAMES_FRAMEWORKS = ("integrations.", "langchain", "llamaindex", "demo")


def _modules() -> dict[str, ast.Module]:
    return {
        ".".join(path.relative_to(PACKAGE).with_suffix("").parts): ast.parse(path.read_text())
        for path in PACKAGE.rglob("*.py")
    }


def _imported(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def _named_modules(tree: ast.Module) -> set[str]:
    """Imports, and strings naming a framework's module (``find_spec("langchain_core")``)."""
    strings = {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant)
        and isinstance(node.value, str)
        and FRAMEWORK_MODULE.fullmatch(node.value)
    }
    return _imported(tree) | strings


def test_only_the_integrations_name_a_framework() -> None:
    offenders = {
        module: sorted(
            name for name in _named_modules(tree) if name.split(".")[0].startswith(FRAMEWORKS)
        )
        for module, tree in _modules().items()
        if not module.startswith(NAMES_FRAMEWORKS)
    }
    assert {module: names for module, names in offenders.items() if names} == {}


def test_the_package_imports_one_way() -> None:
    """No cycle among the package's modules (``__init__`` re-exports lazily: left out)."""
    modules = {name: tree for name, tree in _modules().items() if not name.endswith("__init__")}
    edges = {
        module: {
            target
            for name in _imported(tree)
            if name.startswith("usage_callbacks.")
            and (target := name.removeprefix("usage_callbacks.")) in modules
            and target != module
        }
        for module, tree in modules.items()
    }
    cycles = []
    for start in edges:
        path = [start]
        stack = [iter(sorted(edges[start]))]
        on_path = {start}
        while stack:
            child = next(stack[-1], None)
            if child is None:
                stack.pop()
                on_path.discard(path.pop())
            elif child == start:
                cycles.append([*path, start])
            elif child not in on_path and child > start:  # each cycle once, from its least
                path.append(child)
                on_path.add(child)
                stack.append(iter(sorted(edges[child])))
    assert cycles == []
