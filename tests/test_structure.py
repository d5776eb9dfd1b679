"""The architecture as tests: imports point one way (tui -> core -> prompts) with no cycles, and the
front ends' heavy libraries stay out of core and out of `gptchat --help`.

The import graph is read from the source with ``ast`` (nothing is imported), every import counted,
module-level or inside a function: a cycle hidden by a function-level import is still a cycle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"core": "gptchat.core", "tui": "gptchat.tui", "prompts": "gptchat.prompts"}
UI_LIBRARIES = ("textual", "typer", "rich", "click")


@dataclass(frozen=True)
class Edge:
    src: str
    dst: str  # a gptchat module, or the top-level name of a third-party package
    where: str  # file:line


def module_name(path: Path, root: Path) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = list(rel.parts)
    parts[0] = PACKAGES[parts[0]]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules(root: Path) -> dict[str, Path]:
    return {module_name(p, root): p for folder in PACKAGES if (root / folder).is_dir()
            for p in sorted((root / folder).rglob("*.py"))}


def imports(name: str, path: Path, known: set[str], root: Path) -> list[Edge]:
    """Every import in the file, resolved: gptchat modules by full name, others by top-level name."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            # `from pkg import sub` imports the submodule pkg.sub when there is one
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            out.append(Edge(name, t if t.startswith("gptchat.") else t.split(".")[0], where))
    return out


def graph(root: Path) -> tuple[dict[str, Path], list[Edge]]:
    mods = modules(root)
    return mods, [e for n, p in mods.items() for e in imports(n, p, set(mods), root)]


def cycles(mods, edges: list[Edge]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan's algorithm)."""
    succ = {m: sorted({e.dst for e in edges if e.src == m and e.dst in mods and e.dst != m}) for m in mods}
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in succ[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for m in sorted(mods):
        if m not in index:
            visit(m)
    return out


def violations(root: Path) -> list[str]:
    mods, edges = graph(root)
    found = []
    for comp in cycles(mods, edges):
        inside = [f"{e.src} -> {e.dst} ({e.where})" for e in edges if e.src in comp and e.dst in comp and e.src != e.dst]
        found.append("import cycle: " + "; ".join(sorted(set(inside))))
    for e in edges:
        if e.src.startswith("gptchat.core") and (e.dst in UI_LIBRARIES or e.dst.startswith("gptchat.tui")):
            found.append(f"core imports {e.dst}: {e.where}")
        if e.src.startswith("gptchat.prompts") and e.dst.startswith(("gptchat.core", "gptchat.tui")):
            found.append(f"prompts imports {e.dst}: {e.where}")
    return found


def test_imports_point_one_way_without_cycles():
    mods, edges = graph(ROOT)
    assert len(mods) > 50 and any(e.src.startswith("gptchat.tui") and e.dst.startswith("gptchat.core") for e in edges)
    problems = violations(ROOT)
    assert not problems, "\n".join(problems)


def test_the_checker_finds_what_it_forbids(tmp_path):
    files = {
        "core/__init__.py": "",
        "core/a.py": "def f():\n    from gptchat.core import b\n",  # the cycle hides in a function
        "core/b.py": "from .sub.c import x\n",
        "core/sub/__init__.py": "",
        "core/sub/c.py": "from .. import a\nimport rich.table\n",
        "core/ok.py": "from gptchat.core.sub import c\n",
        "prompts/__init__.py": "from ..core import ok\n",
        "tui/__init__.py": "import textual\nfrom gptchat.core import ok\n",
    }
    for rel, text in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    problems = violations(tmp_path)
    assert len(problems) == 3, problems
    assert problems[0].startswith("import cycle: gptchat.core.a -> gptchat.core.b (core/a.py:2)")
    assert "gptchat.core.sub.c -> gptchat.core.a" in problems[0] and "ok" not in problems[0]
    assert problems[1] == "core imports rich: core/sub/c.py:2"
    assert problems[2] == "prompts imports gptchat.core.ok: prompts/__init__.py:1"


def _run(code: str) -> str:
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().splitlines()[-1]


def test_importing_all_of_core_loads_no_ui_library():
    names = sorted(n for n in modules(ROOT) if n.startswith("gptchat.core"))
    code = "import sys\n" + "".join(f"import {n}\n" for n in names) + (
        f"print(sorted({{m.split('.')[0] for m in sys.modules}} & {set(UI_LIBRARIES)!r}))")
    assert _run(code) == "[]"


def test_help_and_light_commands_load_no_heavy_library():
    code = (
        "import sys\n"
        "from gptchat.tui.cli.main import main\n"
        "for argv in (['--help'], ['generate', '--help'], ['templates', 'list'], ['paths'], ['experiment', '--show', 'none']):\n"
        "    try:\n"
        "        main(argv)\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print([m for m in ('torch', 'transformers', 'textual', 'safetensors', 'tiktoken') if m in sys.modules])\n"
    )
    assert _run(code) == "[]"


def test_every_package_folder_is_installed():
    """pyproject.toml lists packages by hand (the package-dir mapping needs it): a folder missing from the
    list imports in an editable install and is silently absent from a wheel."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {"gptchat." + ".".join(init.parent.relative_to(ROOT).parts)
             for top in ("core", "tui", "prompts") for init in (ROOT / top).glob("**/__init__.py")}
    assert found - listed == set(), "add these packages to pyproject.toml"
    assert listed - found == set(), "these listed packages have no folder"
