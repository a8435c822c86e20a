"""The docs name only functions that exist: every `monet.module.name` and `module.name` in backticks resolves,
and every `function(...)` written in backticks is defined in the package (or is a named outside function)."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
PACKAGE = ROOT / "src" / "monet"
DOCS = sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]
# Module names that also name an object in the docs (`model.layers`: the model's attribute) are only
# checked in their full form (`monet.model.X`).
AMBIGUOUS = {"model", "config", "tokenizer", "build", "code", "server"}
FILE_SUFFIXES = {"py", "json", "yaml", "safetensors", "csv", "md", "png", "parquet", "npz", "npy", "txt", "jsonl", "gz"}
# Functions of other packages (or formula symbols) that the docs write as calls.
OUTSIDE = {"sha256", "int", "E_ij", "torch.load", "torch.topk", "torch.cuda.set_sync_debug_mode", "torch.compile",
           "predict_prob", "p", "nnsight.LanguageModel", "down", "act", "TransformersModel", "datasets.load_dataset"}


def modules() -> dict[str, str]:
    """Short module name -> dotted import path, for every module of the package."""
    out = {}
    for path in PACKAGE.rglob("*.py"):
        if path.stem not in ("__init__", "__main__"):
            out[path.stem] = ".".join(("monet", *path.relative_to(PACKAGE).with_suffix("").parts))
    return out


def resolves(dotted: str) -> bool:
    """Whether `monet.a.b.c` names something: the longest importable module prefix, then attributes."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            target = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for name in parts[cut:]:
                target = getattr(target, name)
        except AttributeError:
            return False
        return True
    return False


def references() -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(file, dotted name) of every backticked package reference, and (file, name) of every backticked call."""
    short = modules()
    names, calls = [], []
    for doc in DOCS:
        for span in re.findall(r"`([^`\n]+)`", doc.read_text(encoding="utf-8")):
            head = re.match(r"[A-Za-z_][A-Za-z0-9_.]*", span)
            if head is None:
                continue
            word = head.group(0).rstrip(".")
            first, _, rest = word.partition(".")
            if first == "monet" and rest:
                names.append((doc.name, word))
            elif first in short and first not in AMBIGUOUS and rest and rest.split(".")[0] not in FILE_SUFFIXES:
                names.append((doc.name, f"{short[first]}.{rest}"))
            elif span[len(word):].startswith("(") and first != "monet":
                calls.append((doc.name, word))
    return names, calls


def test_dotted_names_in_docs_exist() -> None:
    names, _ = references()
    assert len(names) > 20   # the scan finds the docs' references
    missing = [(doc, name) for doc, name in names if not resolves(name)]
    assert not missing, f"docs name things that do not exist: {missing}"


def test_called_functions_in_docs_are_defined() -> None:
    _, calls = references()
    source = "\n".join(path.read_text(encoding="utf-8") for path in PACKAGE.rglob("*.py"))
    defined = set(re.findall(r"^\s*(?:def|class)\s+(\w+)", source, re.M))
    missing = [(doc, name) for doc, name in calls if name.split(".")[-1] not in defined and name not in OUTSIDE]
    assert not missing, f"docs call functions that are not defined: {missing}"


def test_the_scan_catches_a_missing_name() -> None:
    assert resolves("monet.interp.units.units_of") and resolves("monet.edits.parse_steer")
    assert not resolves("monet.edits.add_steer_arguments") and not resolves("monet.interp.atlas.unit_activations")


def test_help_text_names_no_issue_numbers() -> None:
    """The CLI's help comes from settings.py (docstrings and field comments): no tracker references there."""
    text = (PACKAGE / "settings.py").read_text(encoding="utf-8")
    assert not re.findall(r"issue\s*#?\d+", text, re.I)
