"""The layout holds: layers import only downwards, no cycles, no private names across modules, small
modules and functions, and `affiner --help` stays light (no torch, no transformers)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

SOURCE = Path(__file__).resolve().parents[1] / "src" / "affiner"

# What each layer may import from affiner, besides itself. Training and evaluation are peers that never
# import each other; experiments is where they meet; commands wire libraries and never import a verb.
ALLOWED = {
    "core": set(),
    "data": {"core"},
    "training": {"core", "data"},
    "evaluation": {"core", "data"},
    "synth": {"core", "data"},
    "interfaces": {"core", "data"},
    "export": {"core", "data"},
    "experiments": {"core", "data", "training", "evaluation"},
    "commands": {"core", "data", "training", "evaluation", "synth", "interfaces", "export", "experiments"},
    "cli": {"core", "commands", "__init__"},
    "__main__": {"cli"},
    "__init__": set(),
}
SHARED_COMMAND_MODULES = {"affiner.commands.arguments"}  # argument groups several verbs share, not a verb
DATA_TABLES = {"synth/banks.py"}  # question and answer banks: data, not logic
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def modules() -> dict[str, Path]:
    found = {}
    for path in sorted(SOURCE.rglob("*.py")):
        parts = path.relative_to(SOURCE.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def imports(path: Path, module: str) -> list[tuple[int, str, list[str]]]:
    """(line, imported affiner module, names) for every import in the file, in functions too."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name, []) for a in node.names if a.name.split(".")[0] == "affiner"]
        elif isinstance(node, ast.ImportFrom):
            target = node.module or ""
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            if target.split(".")[0] == "affiner":
                found.append((node.lineno, target, [a.name for a in node.names]))
    return found


def resolved(target: str, names: list[str], known: dict[str, Path]) -> list[str]:
    """The modules an import statement reaches (`from affiner.core import files` reaches affiner.core.files)."""
    submodules = [f"{target}.{name}" for name in names if f"{target}.{name}" in known]
    return submodules or [target]


def test_layers_import_only_downwards():
    known = modules()
    wrong = []
    for module, path in known.items():
        for line, target, names in imports(path, module):
            for reached in resolved(target, names, known):
                source, dest = layer(module), layer(reached)
                if source == dest:
                    if source == "commands" and reached != module and reached not in SHARED_COMMAND_MODULES \
                            and module not in SHARED_COMMAND_MODULES:
                        wrong.append(f"{path.relative_to(SOURCE)}:{line} a verb imports a verb ({reached})")
                    continue
                if dest not in ALLOWED.get(source, set()):
                    wrong.append(f"{path.relative_to(SOURCE)}:{line} {source} imports {dest} ({reached})")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    known = modules()
    graph = {m: {r for _, t, n in imports(p, m) for r in resolved(t, n, known) if r in known and r != m}
             for m, p in known.items()}
    # A package's __init__ is imported with each of its modules; it holds a docstring only, so it is left out.
    packages = {m for m, p in known.items() if p.name == "__init__.py"}
    graph = {m: deps - packages for m, deps in graph.items() if m not in packages}
    state: dict[str, str] = {}
    cycles = []

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                cycles.append(" -> ".join(trail[trail.index(dep):] + [dep]))
            elif dep not in state:
                visit(dep, trail + [dep])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert not cycles, "\n".join(cycles)


def test_no_module_reaches_into_another_modules_private_names():
    known = modules()
    wrong = []
    for module, path in known.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        aliases = {}
        for line, target, names in imports(path, module):
            wrong += [f"{path.relative_to(SOURCE)}:{line} imports {target}.{n}" for n in names
                      if n.startswith("_") and n != "__version__"]
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("affiner"):
                aliases.update({a.asname or a.name: a.name for a in node.names if f"{node.module}.{a.name}" in known})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__"):
                wrong.append(f"{path.relative_to(SOURCE)}:{node.lineno} uses {node.value.id}.{node.attr}")
    assert not wrong, "\n".join(wrong)


def test_modules_and_functions_stay_small():
    too_long = []
    for path in sorted(SOURCE.rglob("*.py")):
        name = str(path.relative_to(SOURCE))
        lines = len(path.read_text(encoding="utf-8").splitlines())
        if lines > MAX_MODULE_LINES and name not in DATA_TABLES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}:{node.lineno} {node.name}() is {length} lines")
    assert not too_long, "\n".join(too_long)


def test_the_layering_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The checks above must be able to fail: a core module importing training is reported."""
    fake = tmp_path / "affiner"
    (fake / "core").mkdir(parents=True)
    (fake / "training").mkdir()
    (fake / "core" / "bad.py").write_text("from affiner.training.loop import step\n")
    (fake / "training" / "loop.py").write_text("from affiner.core.bad import x\n")
    monkeypatch.setattr(sys.modules[__name__], "SOURCE", fake)
    with pytest.raises(AssertionError, match="core imports training"):
        test_layers_import_only_downwards()
    with pytest.raises(AssertionError, match="affiner.core.bad -> affiner.training.loop -> affiner.core.bad"):
        test_no_import_cycles()


HEAVY = ("torch", "transformers", "peft", "streamlit", "datasets")
VERBS_TO_CHECK = [[], ["run"], ["prepare"], ["synth"], ["generate"], ["train"], ["evaluate"], ["sweep"],
                  ["export"], ["runs"], ["chat"], ["app"], ["serve"], ["config"]]


@pytest.mark.parametrize("verb", VERBS_TO_CHECK, ids=lambda v: " ".join(v) or "affiner")
def test_help_imports_no_heavy_library(verb):
    code = ("import sys\nfrom affiner import cli\ntry:\n    cli.main(sys.argv[1:] + ['--help'])\n"
            "except SystemExit:\n    pass\n"
            f"print('HEAVY:' + ','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))))")
    result = subprocess.run([sys.executable, "-c", code, *verb], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "usage: affiner" in result.stdout
    assert result.stdout.strip().splitlines()[-1] == "HEAVY:", result.stdout.strip().splitlines()[-1]
