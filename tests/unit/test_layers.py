"""The import floors of DESIGN §1: a module imports only from its own floor or below, lazily or not.

config/losses/rewards -> pipelines -> personalize -> data -> trainers -> commands/annotate/toy -> cli. The library
never imports the toy world, the CLI or the tests, and ``"package.module:function"`` strings count as imports
(no loop hidden behind a registry string).
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "mmalign"
FLOORS = {
    "utils": 0,
    "limits": 0,
    "config": 1,
    "losses": 1,
    "rewards": 1,
    "pipelines": 2,
    "personalize": 3,
    "data": 4,
    "trainers": 5,
    "commands": 6,
    "annotate": 6,
    "toy": 6,
    "cli": 7,
    "__main__": 7,
}
DOTTED = re.compile(r"^mmalign(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_]*)?$")


def floor_of(module: str) -> int | None:
    """Floor of ``mmalign.<part>...``; the package's own ``__init__`` (just a version) is floor 0."""
    parts = module.split(".")
    if parts[0] != "mmalign":
        return None
    return 0 if len(parts) == 1 else FLOORS.get(parts[1])


def imports_of(path: Path) -> list[tuple[int, str]]:
    """(line, module) for every mmalign import (top-level or inside functions) and every dotted-path string."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
            found += [
                (node.lineno, f"{node.module}.{a.name}") for a in node.names if node.module == "mmalign"
            ]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and DOTTED.match(node.value):
            found.append((node.lineno, node.value.partition(":")[0]))
    return [(line, m) for line, m in found if m.split(".")[0] == "mmalign"]


def module_name(path: Path, package: Path = PACKAGE) -> str:
    rel = path.relative_to(package.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(package: Path = PACKAGE) -> list[str]:
    out = []
    for path in sorted(package.rglob("*.py")):
        here = module_name(path, package)
        own = floor_of(here)
        if own is None:
            out.append(
                f"{here}: not on any floor (add its subpackage to FLOORS in this test and to DESIGN §1)"
            )
            continue
        for line, target in imports_of(path):
            there = floor_of(target)
            if there is None:
                out.append(f"{here}:{line} imports {target}, which is on no floor")
            elif there > own:
                out.append(f"{here}:{line} (floor {own}) imports {target} (floor {there})")
    return out


def test_no_module_imports_from_a_higher_floor():
    assert violations() == []


def test_losses_import_torch_and_the_lowest_floor_only():
    allowed = {"torch", "math", "__future__", "typing", "collections", "mmalign"}
    for path in (PACKAGE / "losses").glob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else ([node.module] if isinstance(node, ast.ImportFrom) and node.module else [])
            )
            for name in names:
                assert name.split(".")[0] in allowed, f"{path.name} imports {name}"
                if name.startswith("mmalign"):
                    assert name.startswith(("mmalign.losses", "mmalign.utils")), f"{path.name} imports {name}"


def test_the_checker_catches_an_upward_import(tmp_path):
    pkg = tmp_path / "mmalign"
    (pkg / "data").mkdir(parents=True)
    (pkg / "data" / "bad.py").write_text("def f():\n    from mmalign.toy.render import TOY_WORDS\n")
    (pkg / "losses").mkdir()
    (pkg / "losses" / "sneaky.py").write_text('REGISTRY = {"x": "mmalign.trainers.loop:train"}\n')
    found = violations(pkg)
    assert any("mmalign.data.bad:2" in v and "mmalign.toy.render" in v for v in found)
    assert any("mmalign.losses.sneaky:1" in v and "mmalign.trainers.loop" in v for v in found)


def _modules_after(statements: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules named ``prefixes``... that a fresh interpreter holds after running ``statements``."""
    import json
    import subprocess

    code = (
        f"import json, sys; {statements}; "
        f"print(json.dumps(sorted(m for m in sys.modules if m.startswith({prefixes!r}))))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


def test_importing_the_library_does_not_import_the_toy_world():
    imports = "import mmalign.trainers.loop, mmalign.rewards.score, mmalign.data.structural"
    assert _modules_after(imports, ("mmalign.toy", "mmalign.cli", "mmalign.commands")) == []


def test_the_command_line_parser_starts_without_torch():
    """`mmalign --help`, `--version` and a command's `--help` build every command's parser: no torch import (3 s
    here), which waits for the command that needs it."""
    parser = "import mmalign.cli; mmalign.cli.build_parser()"
    assert _modules_after(parser, ("torch", "diffusers", "transformers")) == []


if __name__ == "__main__":  # python tests/unit/test_layers.py: print the violations
    print("\n".join(violations()) or "no upward imports")
    pytest.main([__file__, "-q"])
