"""The layout rules of the house style that code review alone would let slip (DEVELOPERS.md).

- No stage imports another stage: what two stages share lives in hierdctl/.
- Stages never print or read argv: progress and summaries go through hierdctl.console.
- `hierdctl --help` stays instant: the CLI module imports no heavy library at import time.
- The import graph: stages on top, the library (hierdctl/) below; no library module imports
  a stage (only the CLI, the adapter, runs a stage).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STAGES = sorted(p for p in (ROOT / "stages").glob("*.py") if p.name != "__init__.py")


def _imports(path: Path) -> list[tuple[int, str]]:
    """Every module name `path` imports, anywhere in the file (function-level imports too)."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: `from . import x` / `from .x import y` inside stages/
                out.append((node.lineno, "stages." + (node.module or "")))
            else:
                mod = node.module or ""
                out.append((node.lineno, mod))
                if mod in ("hierdctl.stages", "stages", "hierdctl"):
                    out += [(node.lineno, f"{mod}.{a.name}") for a in node.names]
    return out


def test_the_stages_are_found():
    assert {p.stem for p in STAGES} >= {"cache_teacher", "distill", "export", "eval_retrieval", "eval_zeroshot"}


def test_no_stage_imports_another_stage():
    stage_names = {p.stem for p in STAGES}
    bad = []
    for path in STAGES:
        for line, mod in _imports(path):
            parts = mod.split(".")
            if parts[0] == "hierdctl" and parts[1:2] == ["stages"]:
                parts = parts[1:]
            if parts[0] == "stages" and len(parts) > 1 and parts[1] in stage_names and parts[1] != path.stem:
                bad.append(f"stages/{path.name}:{line} imports {mod}")
    assert not bad, bad


ADAPTERS = ("cli.py", "api.py")  # the command line and the Python API: the two modules that run stages


def test_no_library_module_imports_a_stage():
    library = sorted(p for p in (ROOT / "hierdctl").rglob("*.py") if p.name not in ADAPTERS)
    assert len(library) > 20
    bad = []
    for path in library:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                # relative imports stay within hierdctl/ (hierdctl.stages installs from stages/, never relatively)
                mod = ("hierdctl." * bool(node.level)) + (node.module or "")
                names = [mod] + [f"{mod}.{a.name}" for a in node.names if mod in ("hierdctl", "hierdctl.")]
            bad += [f"{path.relative_to(ROOT)}:{node.lineno} imports {n}" for n in names
                    if n.split(".")[:2] == ["hierdctl", "stages"] or n.split(".")[0] == "stages"]
    assert not bad, bad


def test_stages_do_not_print_or_read_argv():
    bad = []
    for path in STAGES:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("print", "input"):
                bad.append(f"stages/{path.name}:{node.lineno} calls {node.func.id}()")
            if (isinstance(node, ast.Attribute) and node.attr == "argv"
                    and isinstance(node.value, ast.Name) and node.value.id == "sys"):
                bad.append(f"stages/{path.name}:{node.lineno} reads sys.argv")
    assert not bad, bad


def test_help_imports_no_heavy_library():
    code = ("import sys, hierdctl.cli; heavy = [m for m in ('torch', 'numpy', 'open_clip', 'transformers', "
            "'webdataset', 'faiss', 'PIL') if m in sys.modules]; print(','.join(heavy))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"importing hierdctl.cli pulls in: {out.stdout.strip()}"


def test_only_the_adapters_name_a_stage_module_to_import_it():
    """importlib.import_module("hierdctl.stages.X") is an import the AST check above cannot see."""
    bad = []
    for path in sorted((ROOT / "hierdctl").rglob("*.py")):
        if path.name in ADAPTERS:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("hierdctl.stages."):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} names {node.value}")
    assert not bad, bad
