"""No pickle is ever loaded from a user's file: every ``torch.load`` in the package and its scripts passes
``weights_only=True``, and nothing calls ``pickle.load``/``pickle.loads`` (safetensors everywhere else)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            name = f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name) else getattr(f, "id", "")
            yield name, node


def scan(paths) -> tuple[int, list[str]]:
    """(the number of ``torch.load`` calls seen, every unsafe load as ``path:line what``)."""
    checked, offenders = 0, []
    for path in paths:
        for name, node in _calls(ast.parse(Path(path).read_text(), filename=str(path))):
            where = f"{Path(path).name}:{node.lineno}"
            if name == "torch.load":
                checked += 1
                safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant) and k.value.value is True for k in node.keywords)
                if not safe:
                    offenders.append(f"{where} torch.load without weights_only=True")
            elif name in ("pickle.load", "pickle.loads", "dill.load", "joblib.load"):
                offenders.append(f"{where} {name}")
    return checked, offenders


def test_no_unsafe_loads_in_the_package_or_its_scripts():
    checked, offenders = scan(sorted([*ROOT.glob("src/**/*.py"), *ROOT.glob("benchmarks/*.py")]))
    assert not offenders, offenders
    assert checked >= 1  # the scan sees the package's own (safe) torch.load


def test_the_scan_catches_unsafe_loads(tmp_path):
    module = tmp_path / "bad.py"
    module.write_text("import torch, pickle\ntorch.load(p)\ntorch.load(p, weights_only=False)\npickle.load(f)\ntorch.load(p, weights_only=True)\n")
    checked, offenders = scan([module])
    assert checked == 3 and offenders == ["bad.py:2 torch.load without weights_only=True", "bad.py:3 torch.load without weights_only=True", "bad.py:4 pickle.load"]
