"""Targets as plug-ins: the registry and contract (a toy target registered from a test runs through the
API, the JIT cache, packages and info), per-target source hashes, no import cycles, and a deploy path
that imports neither the compiler, the JIT builder nor the tuner."""
from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import fag_tvm
from fag_tvm import FagError, targets
from fag_tvm.testing import rel_err

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "fag_tvm"
TESTS = Path(__file__).resolve().parent


@pytest.fixture
def toy():
    sys.path.insert(0, str(TESTS))
    from toy_target import TOY

    targets.register(TOY, replace=True)
    yield TOY
    targets.unregister("toy")


def _call(target, seed=0, **extra):
    rng = np.random.default_rng(seed)
    q, k, v, dy = (rng.standard_normal((1, 2, 20, 8)).astype(np.float32) for _ in range(4))
    kw = dict(head_num=2, input_layout="BNSD", scale_value=0.3, **extra)
    return (fag_tvm.flash_attention_score_grad(q, k, v, dy, target=target, **kw),
            fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **kw))


def test_toy_target_runs_through_api_jit_package_and_info(toy, tmp_path, monkeypatch):
    monkeypatch.setenv("FAG_TVM_CACHE", str(tmp_path / "cache"))
    from fag_tvm import jit
    from fag_tvm.cli.info import collect

    jit.clear_memory_cache()
    g, gr = _call("toy")
    for a, b in zip(g[:3], gr[:3]):
        assert rel_err(a, b) < 1e-6
    libs = list((tmp_path / "cache" / "toy").rglob("*.so"))
    assert len(libs) == 2 and all(p.name.startswith("fag_") and "_toy" in p.name for p in libs), libs
    assert collect()["targets"]["toy"]["available"]
    # an AOT package of the toy target, loaded with the toy's own loader
    from fag_tvm.package import build_package

    wl = [{"B": 1, "N1": 2, "N2": 2, "Sq": 20, "Skv": 20, "D": 8, "Dv": 8, "input_layout": "BNSD",
           "dtype": "fp32", "sparse_mode": 0}]
    build_package(wl, str(tmp_path / "pkg"), ("toy", "llvm"), log=lambda s: None)
    man = json.loads((tmp_path / "pkg" / "manifest.json").read_text())
    assert [a["target"] for a in man["artifacts"]] == ["toy", "llvm"]
    pkg = fag_tvm.runtime.load(str(tmp_path / "pkg"))
    rng = np.random.default_rng(0)
    q, k, v, dy = (rng.standard_normal((1, 2, 20, 8)).astype(np.float32) for _ in range(4))
    for t in ("toy", "llvm"):
        gp = pkg.flash_attention_score_grad(q, k, v, dy, head_num=2, input_layout="BNSD", scale_value=0.3, target=t)
        for a, b in zip(gp[:3], gr[:3]):
            assert rel_err(a, b) < 2e-5, t
    jit.clear_memory_cache()


def test_unknown_target_is_a_fag_error():
    with pytest.raises(FagError) as e:
        _call("nope")
    assert e.value.code == 161002 and "target" in str(e.value)


def test_registry_refuses_to_shadow(toy):
    with pytest.raises(ValueError):
        targets.register(toy)
    with pytest.raises(ValueError):
        targets.unregister("llvm")


# ------------------------------------------------------------------------------------------------
# per-target source hashes


_HASHES = r"""
import json, sys
sys.path.insert(0, {tests!r})
from fag_tvm import targets
from toy_target import TOY
print(json.dumps({{"llvm": targets.get("llvm").source_hash(), "toy": TOY.source_hash()}}))
"""


def _hashes(root: Path) -> dict:
    env = dict(os.environ, PYTHONPATH=str(root))
    r = subprocess.run([sys.executable, "-c", _HASHES.format(tests=str(root / "tests"))], env=env, cwd=str(root),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_editing_one_target_never_stales_another(tmp_path):
    """A copy of the package (schedules/ placed as installed): editing the llvm kernel changes only llvm's
    hash; editing the shared math changes every target's."""
    root = tmp_path / "copy"
    shutil.copytree(PKG, root / "fag_tvm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "schedules", root / "fag_tvm" / "schedules", ignore=shutil.ignore_patterns("__pycache__"),
                    dirs_exist_ok=True)
    shutil.copytree(TESTS, root / "tests", ignore=shutil.ignore_patterns("__pycache__"))
    h0 = _hashes(root)
    assert h0["llvm"] == targets.get("llvm").source_hash()  # installed layout == checkout layout
    with open(root / "fag_tvm" / "targets" / "llvm" / "bwd.py", "a") as f:
        f.write("\n# edited\n")
    h1 = _hashes(root)
    assert h1["llvm"] != h0["llvm"] and h1["toy"] == h0["toy"]
    with open(root / "tests" / "toy_target.py", "a") as f:
        f.write("\n# edited\n")
    h2 = _hashes(root)
    assert h2["llvm"] == h1["llvm"] and h2["toy"] != h1["toy"]
    with open(root / "fag_tvm" / "kernels" / "common" / "score.py", "a") as f:
        f.write("\n# edited\n")
    h3 = _hashes(root)
    assert h3["llvm"] != h2["llvm"] and h3["toy"] != h2["toy"]
    with open(root / "fag_tvm" / "schedules" / "llvm.py", "a") as f:
        f.write("\n# edited\n")
    h4 = _hashes(root)
    assert h4["llvm"] != h3["llvm"] and h4["toy"] == h3["toy"]


# ------------------------------------------------------------------------------------------------
# import structure


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = list(rel.with_suffix("").parts)
    if parts[0] == "schedules":
        parts = ["fag_tvm", *parts]
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _sources() -> dict[str, Path]:
    files = [p for p in PKG.rglob("*.py") if "__pycache__" not in p.parts]
    files += [p for p in (ROOT / "schedules").glob("*.py")]
    return {_module_name(p): p for p in files}


def import_graph() -> dict[str, set[str]]:
    """module -> fag_tvm modules it imports, at module level or inside functions (implicit imports of a
    module's parent packages are not edges: a package importing its own submodules is not a cycle)."""
    mods = _sources()
    graph: dict[str, set[str]] = {m: set() for m in mods}
    for mod, path in mods.items():
        is_pkg = path.name == "__init__.py"
        pkg = mod if is_pkg else mod.rsplit(".", 1)[0]
        for node in ast.walk(ast.parse(path.read_text())):
            targets_: list[str] = []
            if isinstance(node, ast.Import):
                targets_ = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = pkg.split(".")
                    base = base[:len(base) - node.level + 1]
                    base_name = ".".join(base + ([node.module] if node.module else []))
                else:
                    base_name = node.module or ""
                for a in node.names:
                    full = f"{base_name}.{a.name}"
                    targets_.append(full if full in mods else base_name)
            if mod == "fag_tvm.targets" and isinstance(node, ast.Assign) and \
                    any(getattr(x, "id", "") == "_BUILTIN" for x in node.targets):
                # the registry imports built-in targets by name on first use: a real dependency
                targets_ += [v.value.split(":")[0] for v in node.value.values]
            for t in targets_:
                while t and t not in mods and "." in t:
                    t = t.rsplit(".", 1)[0]
                if t in mods and t != mod and not mod.startswith(t + "."):
                    graph[mod].add(t)
    return graph


def test_no_import_cycles():
    graph = import_graph()
    assert len(graph) > 40 and "fag_tvm.targets.llvm" in graph["fag_tvm.targets"]
    assert "fag_tvm.targets" in graph["fag_tvm.api"] and "fag_tvm.jit" in graph["fag_tvm.api"]
    index, low, stack, on, sccs = {}, {}, [], set(), []

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
                sccs.append(sorted(comp))

    sys.setrecursionlimit(10000)
    for v in graph:
        if v not in index:
            visit(v)
    assert not sccs, f"import cycles: {sccs}"


def test_tvm_imports_only_through_the_compat_module():
    """`import tvm` / `import tvm_ffi` at module level only in fag_tvm._tvm (elsewhere inside functions
    that build or load code)."""
    offenders = []
    for mod, path in _sources().items():
        if mod == "fag_tvm._tvm":
            continue
        for node in ast.parse(path.read_text()).body:
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else []
            if any(n == "tvm" or n.startswith(("tvm.", "tvm_ffi")) for n in names):
                offenders.append(mod)
    assert not offenders, offenders


_DEPLOY = r"""
import json, sys
import fag_tvm.runtime as rt
pkg = rt.load({pkg!r})
import numpy as np, fag_tvm
rng = np.random.default_rng(0)
q, k, v, dy = (rng.standard_normal((1, 2, 20, 8)).astype(np.float32) for _ in range(4))
pkg.flash_attention_score_grad(q, k, v, dy, head_num=2, input_layout="BNSD")
maps = open("/proc/self/maps").read()
print(json.dumps({{"modules": sorted(m for m in sys.modules if m.startswith(("fag_tvm.jit", "fag_tvm.tune", "tvm"))
                                     and not m.startswith("tvm_ffi")),
                  "compiler_mapped": "libtvm_compiler" in maps or "/libtvm.so" in maps}}))
"""


def test_deploy_path_imports_neither_compiler_nor_jit_nor_tuner(tmp_path):
    from fag_tvm.package import build_package

    wl = [{"B": 1, "N1": 2, "N2": 2, "Sq": 20, "Skv": 20, "D": 8, "Dv": 8, "input_layout": "BNSD",
           "dtype": "fp32", "sparse_mode": 0}]
    build_package(wl, str(tmp_path / "pkg"), log=lambda s: None)
    r = subprocess.run([sys.executable, "-c", _DEPLOY.format(pkg=str(tmp_path / "pkg"))], capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out == {"modules": [], "compiler_mapped": False}, out
