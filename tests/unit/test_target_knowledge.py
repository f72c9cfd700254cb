"""Per-target knowledge lives in targets/<name>/: nothing in the core compares or spells a target's name."""

import ast
import re
from pathlib import Path

from edgeexport.targets import REGISTRY, all_targets, get_target, known_precisions

ROOT = Path(__file__).resolve().parents[2]
CORE = [ROOT / "edgeexport", ROOT / "calibration"]


def _docstrings(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def test_no_target_name_outside_targets():
    """A target-name string in the core (a comparison, a table key, a help text naming targets) means adding a
    target would touch the core; those facts come from the registry."""
    word = re.compile(r"\b(" + "|".join(map(re.escape, REGISTRY)) + r")\b")
    hits = []
    for root in CORE:
        for path in sorted(root.rglob("*.py")):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            docs = _docstrings(tree)
            for node in ast.walk(tree):
                if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docs \
                        and word.search(node.value):
                    hits.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value[:80]!r}")
    assert not hits, "\n".join(hits)


def test_the_scan_sees_a_target_name():
    """The scan above is not vacuous: a core-style comparison is found."""
    word = re.compile(r"\b(" + "|".join(map(re.escape, REGISTRY)) + r")\b")
    tree = ast.parse('if target != "tflite":\n    pass\n')
    assert any(isinstance(n, ast.Constant) and word.search(str(n.value)) for n in ast.walk(tree))


def test_each_target_declares_its_own_facts():
    for target in all_targets():
        assert target.precisions and set(target.precisions) <= set(known_precisions())
        for precision in target.precisions:
            assert target.precision_label(precision)
        assert target.weight_only in (None, *target.precisions)
        for option in target.cli_options:
            assert option.flag.startswith("--") and option.key in target.options_spec, option
        backend = target.loader_backend()
        assert backend is not None and backend.parent.name == target.name  # targets/<name>/backend.py
        assert "# ---- backend: appended to the loader core" in backend.read_text()


def test_a_target_flag_is_refused_with_another_target(tmp_path):
    from click.testing import CliRunner

    from edgeexport.cli import main

    flag = next((o.flag, t.name) for t in all_targets() for o in t.cli_options)
    other = next(t.name for t in all_targets() if flag[0] not in {o.flag for o in t.cli_options})
    choice = next(o.choices[0] for t in all_targets() for o in t.cli_options if o.flag == flag[0])
    result = CliRunner().invoke(main, ["build", "--target", other, "--model", "m.onnx", flag[0], choice,
                                       "--out", str(tmp_path / "b"), "--dry-run"])
    assert result.exit_code == 2 and f"{flag[0]} applies to --target {flag[1]}" in result.output, result.output


def test_registry_modules_are_units():
    for name, (module, _) in REGISTRY.items():
        if get_target(name).public:
            assert module == f"edgeexport.targets.{name}.target"


def _module_graph() -> dict[str, set[str]]:
    """edgeexport's modules (targets/ and calibration/ under their installed names) -> the modules they import,
    lazily or not."""
    mods = {}
    for base, pkg in ((ROOT / "edgeexport", "edgeexport"), (ROOT / "targets", "edgeexport.targets"),
                      (ROOT / "calibration", "edgeexport.calibration")):
        for path in base.rglob("*.py"):
            parts = [x for x in path.relative_to(base).with_suffix("").parts if x != "__init__"]
            mods[".".join([pkg, *parts])] = path
    graph = {}
    for name, path in mods.items():
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and not node.level:
                deps.add(node.module)
                deps |= {f"{node.module}.{a.name}" for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[name] = {d for d in deps if d in mods and d != name}
    return graph


def test_no_two_modules_import_each_other():
    graph = _module_graph()
    assert len(graph) > 40
    circles = sorted((a, b) for a in graph for b in graph[a] if a < b and a in graph[b])
    assert not circles, circles
