"""The layout's rules (docs/design.md), read from the source: which package may import which,
where torch may be imported, and that the admin's side of the node never loads torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

from tests.support.paths import REPO

PACKAGES = ("node", "pipeline", "train")
# (importer, what no module under it may reach, directly or through other modules)
FORBIDDEN = (
    ("pipeline.dicom", ("pipeline.state", "pipeline.model")),
    ("pipeline", ("node", "train")),
    ("train", ("node",)),
)
TORCH_ALLOWED = ("pipeline.model", "pipeline.synthesis", "pipeline.worker", "train")


def _modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _imports(path: Path, known: set[str]) -> set[str]:
    """Every module ``path`` imports, wherever the import stands (in a function, under
    TYPE_CHECKING): ``from a import b`` names ``a.b`` when that is a module, else ``a``."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            for alias in node.names:
                child = f"{node.module}.{alias.name}"
                names.add(child if child in known else node.module)
    return names


def _within(module: str, package: str) -> bool:
    return module == package or module.startswith(package + ".")


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    return {name: _imports(path, set(modules)) for name, path in modules.items()}


def _chain(graph: dict[str, set[str]], start: str, targets: tuple[str, ...]) -> list[str]:
    """The first import chain from ``start`` to a module under ``targets``, or []."""
    seen, stack = {start}, [[start]]
    while stack:
        chain = stack.pop()
        for imported in sorted(graph.get(chain[-1], ())):
            if any(_within(imported, target) for target in targets):
                return [*chain, imported]
            if imported in graph and imported not in seen:
                seen.add(imported)
                stack.append([*chain, imported])
    return []


def test_layers_import_only_what_the_rules_allow() -> None:
    graph = _graph()
    broken = [
        " -> ".join(chain)
        for source, targets in FORBIDDEN
        for module in graph
        if _within(module, source) and (chain := _chain(graph, module, targets))
    ]
    assert broken == []


def test_only_the_model_side_imports_torch() -> None:
    importers = [
        module
        for module, imported in _graph().items()
        if any(_within(name, "torch") for name in imported)
    ]
    assert importers  # the check reads the imports it means to
    assert [m for m in importers if not any(_within(m, a) for a in TORCH_ALLOWED)] == []


def test_reading_the_config_and_a_service_without_a_worker_do_not_load_torch(tmp_path) -> None:
    # `dicomnode serve` with [worker] in_process = false, and the admin's quick commands,
    # must start without the 2 s torch takes to import.
    config = tmp_path / "config.toml"
    config.write_text(
        '[node]\nstorage = "spool"\ndatabase = "sqlite:///node.sqlite"\n'
        "[worker]\nin_process = false\n"
    )
    code = textwrap.dedent(
        f"""
        import sys
        import node.config, node.dispatch, node.service
        service = node.service.NodeService(node.config.load_config({str(config)!r}))
        print(sorted(name for name in sys.modules if name.split(".")[0] == "torch"))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "[]", result.stderr
