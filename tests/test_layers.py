"""The package's import direction (docs/design.md, "Layers"), read from the source's AST:
every import of a cdp_fast module, at module level or inside a function, goes down the layers;
there is no import cycle between modules; no module imports another module's private name;
the Triton kernels import nothing from cdp_fast."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "cdp_fast"

#: subpackage -> the subpackages it may import (besides itself). Bottom to top:
#: utils <- ops <- models / data <- diffusion <- guidance <- sampling; robust on ops / data;
#: label / metrics above robust; theory on diffusion; cli and demo are applications (they may
#: also use the front door, ``import cdp_fast``).
ALLOWED = {
    "utils": set(),
    "ops": {"utils", "kernels", "_C"},
    "models": {"utils"},
    "data": {"utils"},
    "diffusion": {"ops", "models", "data", "utils"},
    "guidance": {"diffusion", "ops", "models", "data", "utils"},
    "sampling": {"guidance", "diffusion", "ops", "models", "data", "utils"},
    "robust": {"ops", "models", "data", "utils"},
    "label": {"robust", "ops", "models", "data", "utils"},
    "metrics": {"robust", "ops", "models", "data", "utils"},
    "theory": {"diffusion", "ops", "utils"},
    "demo": {"", "sampling", "guidance", "diffusion", "ops", "models", "data", "utils", "robust", "label",
             "metrics", "theory"},
    "cli": {"", "demo", "sampling", "guidance", "diffusion", "ops", "models", "data", "utils", "robust", "label",
            "metrics", "theory"},
    "__main__": {"cli"},
    "": set(),                     # cdp_fast/__init__.py: a lazy table of strings, imports nothing
}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules():
    return {_module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def _is_module(name: str, mods) -> bool:
    return name in mods or name in ("cdp_fast.kernels", "cdp_fast._C") or name.startswith("cdp_fast.kernels.")


def _imports(name: str, path: Path, mods):
    """(target module, imported attribute or None, line) for every cdp_fast import in ``path``."""
    is_pkg = path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(a.name, None, node.lineno) for a in node.names if a.name.split(".")[0] == "cdp_fast"]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                src = ".".join(base + ([node.module] if node.module else []))
            else:
                src = node.module or ""
            if src.split(".")[0] != "cdp_fast":
                continue
            for a in node.names:
                sub = f"{src}.{a.name}"
                out.append((sub, None, node.lineno) if _is_module(sub, mods) else (src, a.name, node.lineno))
    return out


def _layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def test_every_import_goes_down_the_layers():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        mine = _layer(name)
        assert mine in ALLOWED, f"{name}: subpackage {mine!r} has no row in ALLOWED (add it to the layer table)"
        for target, _, line in _imports(name, path, mods):
            theirs = _layer(target)
            if theirs != mine and theirs not in ALLOWED[mine]:
                bad.append(f"{path.relative_to(ROOT)}:{line}: {mine or 'cdp_fast'} imports {target}")
    assert not bad, "imports against the layer rule:\n" + "\n".join(bad)


def test_no_import_cycles_also_through_function_level_imports():
    mods = _modules()
    graph = {name: {t for t, _, _ in _imports(name, path, mods) if t in mods and t != name}
             for name, path in mods.items()}
    # Tarjan's strongly connected components: any component of two or more modules is a cycle
    index, low, stack, on, cycles = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
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
                cycles.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    assert not cycles, f"import cycles: {cycles}"


def test_no_module_imports_another_modules_private_name():
    mods = _modules()
    bad = [f"{path.relative_to(ROOT)}:{line}: from {target} import {attr}"
           for name, path in mods.items() for target, attr, line in _imports(name, path, mods)
           if attr is not None and attr.startswith("_") and target != name]
    assert not bad, "private names imported across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("path", sorted((ROOT / "kernels").glob("*.py")), ids=lambda p: p.name)
def test_triton_kernels_import_nothing_from_cdp_fast(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            assert not node.level and (node.module or "").split(".")[0] != "cdp_fast", (path, node.lineno)
        elif isinstance(node, ast.Import):
            assert all(a.name.split(".")[0] != "cdp_fast" for a in node.names), (path, node.lineno)


def test_the_layer_test_sees_a_violation(tmp_path):
    """The checks above can fail: a utils module importing sampling is reported."""
    fake = PKG / "utils" / "checks.py"
    name = _module_name(fake)
    tree = "from cdp_fast.sampling.driver import sample\nfrom cdp_fast.data.samples import _LazyConcat\n"
    p = tmp_path / "checks.py"
    p.write_text(tree)
    found = _imports(name, p, _modules())
    assert ("cdp_fast.sampling.driver", "sample", 1) in found
    assert _layer(found[0][0]) not in ALLOWED["utils"]
    assert any(attr and attr.startswith("_") for _, attr, _ in found)


#: functions that are (or implement) a registered torch.library op: their positional parameters
#: are the op's schema, as aten's are (docs/design.md, "Layers")
OP_SCHEMAS = {
    "cdp_fast/ops/contrastive/__init__.py": {"_forward", "_backward", "contrastive_stats", "contrastive_stats_backward",
                                             "_stats_fake", "_stats_bwd_fake"},
    "cdp_fast/ops/contrastive/chunked.py": {"lse_stats_forward", "lse_stats_backward"},
    "cdp_fast/ops/ddim/__init__.py": {"ddim_update_op", "_ddim_fake"},
}


def test_no_function_takes_more_than_eight_positional_parameters():
    bad = []
    for path in sorted(PKG.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                args = node.args.posonlyargs + node.args.args
                k = len(args) - (1 if args and args[0].arg in ("self", "cls") else 0)
                if k > 8 and node.name not in OP_SCHEMAS.get(rel, ()):
                    bad.append(f"{rel}:{node.lineno} {node.name}: {k} positional parameters")
    assert not bad, "make the options keyword-only or pass an options object:\n" + "\n".join(bad)
