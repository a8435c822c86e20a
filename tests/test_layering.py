"""The package's import graph follows docs/architecture.md: one direction, no cycles, no hidden imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).parents[1] / "src"

# Every module of the package, in layer order: a module may import only modules listed before it.
ORDER = [
    "monet.errors", "monet.io", "monet.presets", "monet.settings", "monet.config", "monet.runtime", "monet.kernels",
    "monet.sparse",
    "monet.ops", "monet.edits", "monet.remote_code", "monet.model",
    "monet.data.documents", "monet.data.packages", "monet.data.tokenizer", "monet.data.storage", "monet.data.code",
    "monet.data.domains", "monet.data.languages", "monet.data.toxicity", "monet.data.lock", "monet.data.files",
    "monet.data.tasks",
    "monet.data.build", "monet.data.images",
    "monet.data",
    "monet.checkpoint", "monet.info", "monet.evaluate", "monet.generate", "monet.train", "monet.vision",
    "monet.interp.capture", "monet.interp.hooks", "monet.interp.units", "monet.interp.atlas", "monet.interp.criteria",
    "monet.interp.monosemanticity", "monet.interp.probe", "monet.interp.saebench",
    "monet.interp.query", "monet.interp.image_examples", "monet.interp.explain", "monet.interp.export",
    "monet.interp.autointerp",
    "monet.interp.viewer.steering", "monet.interp.viewer.server",
    "monet.interp.viewer", "monet.interp",
    "monet.experiments.protocol_stats", "monet.experiments.dense_rules", "monet.experiments.benchmarks",
    "monet.experiments.unlearn", "monet.experiments.export",
    "monet.experiments.toxicity",
    "monet.experiments.bench", "monet.experiments.demo", "monet.experiments.sae",
    "monet.experiments", "monet.cli", "monet.__main__", "monet",
]
# Function-local imports of our own modules are allowed only where they are deliberate lazy imports.
LAZY = {"monet.cli", "monet", "monet_cli"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, bool]]:
    """(imported monet module, imported at module level?) for every import of our package in a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {id(node) for node in tree.body}
    for node in tree.body:
        if isinstance(node, ast.If):   # `if "monet_cli" not in sys.modules: import ...` counts as top level
            top |= {id(child) for child in node.body}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names]
            names += [node.module] if node.module != "monet" else []   # `from monet import ops` imports monet.ops
        for name in names:
            if name == "monet" or name.startswith("monet."):
                found.append((name, id(node) in top))
    return found


def test_every_module_is_placed_and_imports_point_up() -> None:
    files = {module_name(p): p for p in SRC.joinpath("monet").rglob("*.py")}
    assert set(files) == set(ORDER), f"place new modules in ORDER: {sorted(set(files) ^ set(ORDER))}"
    rank = {name: i for i, name in enumerate(ORDER)}
    problems = []
    for name, path in files.items():
        for target, at_top in imports(path):
            if target not in rank:
                continue   # `from monet.x import Name` also yields "monet.x.Name", which is not a module
            if rank[target] >= rank[name] and target != name and name not in LAZY:
                problems.append(f"{name} imports {target}, which comes after it (an upward import or a cycle)")
            if not at_top and name not in LAZY:
                problems.append(f"{name} imports {target} inside a function (hidden dependency)")
    assert not problems, "\n".join(problems)


def test_help_loads_neither_torch_nor_transformers() -> None:
    code = ("import sys, monet_cli; from monet.cli import main\n"
            "for argv in (['--help'], ['train', '--help'], ['atlas', 'build', '--help'], ['--version']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "heavy = [m for m in ('torch', 'transformers', 'numpy') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
