"""AOT packages, the compiler-free runtime loader, tampering, concurrency and the aclnn two-phase mirror."""
from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import threading

import numpy as np
import pytest

import fag_tvm
from fag_tvm import FagError, masks
from fag_tvm.testing import rel_err

pytestmark = pytest.mark.xdist_group("package")  # one worker: the module's package is built once

WORKLOADS = [
    {"B": 1, "N1": 2, "N2": 1, "Sq": 64, "Skv": 64, "D": 32, "Dv": 32, "input_layout": "BNSD", "dtype": "fp32",
     "sparse_mode": 3},
    {"B": 1, "N1": 2, "N2": 2, "Sq": 50, "Skv": 40, "D": 16, "Dv": 16, "input_layout": "BSH", "dtype": "fp16",
     "sparse_mode": 0},
]


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    from fag_tvm.package import build_package

    out = str(tmp_path_factory.mktemp("pkg") / "pkg")
    build_package(WORKLOADS, out, log=lambda s: None)
    return out


def _copy(package, tmp_path):
    dst = str(tmp_path / "pkg")
    shutil.copytree(package, dst)
    return dst


def _inputs(seed=0, layout="BNSD"):
    rng = np.random.default_rng(seed)
    if layout == "BNSD":
        q = rng.standard_normal((3, 2, 70, 32)).astype(np.float32)  # other B/S than the workload: same kernel
        k = rng.standard_normal((3, 1, 90, 32)).astype(np.float32)
        v = rng.standard_normal((3, 1, 90, 32)).astype(np.float32)
        dy = rng.standard_normal((3, 2, 70, 32)).astype(np.float32)
        kw = dict(head_num=2, input_layout="BNSD", atten_mask=masks.compressed_causal_mask(), sparse_mode=3,
                  scale_value=0.2)
        return q, k, v, dy, kw
    q = rng.standard_normal((2, 33, 2 * 16)).astype(np.float16)
    k = rng.standard_normal((2, 41, 2 * 16)).astype(np.float16)
    v = rng.standard_normal((2, 41, 2 * 16)).astype(np.float16)
    dy = rng.standard_normal((2, 33, 2 * 16)).astype(np.float16)
    return q, k, v, dy, dict(head_num=2, input_layout="BSH", scale_value=0.25)


_FRESH = r"""
import sys, json, numpy as np
sys.path.insert(0, {tests!r})
import fag_tvm, fag_tvm.runtime as rt
from test_package import _inputs
from fag_tvm.testing import rel_err
pkg = rt.load({pkg!r})
errs = []
for layout, tol in (("BNSD", 2e-5), ("BSH", 5e-3)):
    q, k, v, dy, kw = _inputs(1, layout)
    f = pkg.flash_attention_score(q, k, v, **kw)
    fr = fag_tvm.reference.flash_attention_score(q, k, v, **kw)
    g = pkg.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max, softmax_sum=f.softmax_sum,
                                       attention_in=f.attention_out, **kw)
    gr = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, softmax_max=f.softmax_max,
                                                      softmax_sum=f.softmax_sum, attention_in=f.attention_out, **kw)
    errs += [rel_err(f.attention_out, fr.attention_out) / tol] + [rel_err(a, b) / tol for a, b in zip(g[:3], gr[:3])]
maps = open("/proc/self/maps").read()
print(json.dumps({{"errs": errs, "compiler_mapped": "libtvm_compiler" in maps or "/libtvm.so" in maps,
                  "tvm_imported": "tvm" in sys.modules, "runtime_mapped": "libtvm_runtime" in maps}}))
"""


def test_package_runs_in_fresh_process_without_compiler(package):
    tests = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run([sys.executable, "-c", _FRESH.format(tests=tests, pkg=package)], check=True,
                         capture_output=True, text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    assert not r["compiler_mapped"] and not r["tvm_imported"] and r["runtime_mapped"], r
    assert max(r["errs"]) <= 1.0, r["errs"]


def _lib(package) -> str:
    m = json.load(open(os.path.join(package, "manifest.json")))
    return os.path.join(package, m["artifacts"][0]["library"])


def test_manifest_contents(package):
    m = json.load(open(os.path.join(package, "manifest.json")))
    assert m["tvm_version"] == "0.27.0.post1" and m["fag_tvm_version"] == fag_tvm.__version__
    (a,) = m["artifacts"]
    assert a["target"] == "llvm" and a["hw"]["mcpu"] != "native"
    assert len(a["kernels"]) == 4 and all(k["entry"].startswith("fag_") for k in a["kernels"])
    assert all(k["entry"].endswith("_" + a["hw"]["mcpu"].replace("-", "")) for k in a["kernels"])
    assert set(m["files"]) == {a["library"], "libtvm_runtime.so"}
    assert stat.S_IMODE(os.stat(package).st_mode) & 0o055, "packages are not private (0700)"


def _edit_manifest(pkg, fn):
    man = os.path.join(pkg, "manifest.json")
    m = json.load(open(man))
    fn(m)
    json.dump(m, open(man, "w"))


def _kernel0(m):
    return m["artifacts"][0]["kernels"][0]


MANIFEST_EDITS = {
    "spec_d": lambda m: _kernel0(m)["spec"].update(d=_kernel0(m)["spec"]["d"] * 2),
    "spec_dv": lambda m: _kernel0(m)["spec"].update(dv=1),
    "spec_dtype": lambda m: _kernel0(m)["spec"].update(dtype="float16"),
    "spec_type": lambda m: _kernel0(m)["spec"].update(d="32"),
    "knobs": lambda m: _kernel0(m)["knobs"].update(block_q=_kernel0(m)["knobs"]["block_q"] * 2),
    "hw_mcpu": lambda m: m["artifacts"][0]["hw"].update(mcpu="x86-64"),
    "library_outside": lambda m: m["artifacts"][0].update(library="../" + m["artifacts"][0]["library"]),
    "library_absolute": lambda m: m["artifacts"][0].update(library="/lib/x86_64-linux-gnu/libc.so.6"),
    "files_outside": lambda m: m["files"].update({"../x.so": {"size": 1, "sha256": "0" * 64}}),
    "no_files": lambda m: m.pop("files"),
    "no_artifacts": lambda m: m.pop("artifacts"),
    "no_hw": lambda m: m["artifacts"][0].pop("hw"),
    "kernels_not_list": lambda m: m["artifacts"][0].update(kernels={"a": 1}),
    "entry_missing_in_library": lambda m: _kernel0(m).update(entry=_kernel0(m)["entry"] + "x"),
    "unknown_target": lambda m: m["artifacts"][0].update(target="nope"),
    "other_tvm_version": lambda m: m.update(tvm_version="0.26.0"),
    "other_source_hash": lambda m: m["artifacts"][0].update(source_hash="0" * 64),
    "null_manifest": lambda m: m.clear(),
}


@pytest.mark.parametrize("how", sorted(MANIFEST_EDITS))
def test_edited_manifest_refused(package, tmp_path, how):
    """The loader trusts nothing it can derive: every edit is a FagError before any code runs."""
    pkg = _copy(package, tmp_path)
    _edit_manifest(pkg, MANIFEST_EDITS[how])
    with pytest.raises(FagError) as e:
        fag_tvm.runtime.load(pkg)
    assert e.value.code == 161002 and "package" in str(e.value) or "target" in str(e.value), str(e.value)


def test_missing_kernel_is_named(package):
    pkg = fag_tvm.runtime.load(package)
    q, k, v, dy, kw = _inputs(2)
    with pytest.raises(FagError) as e:  # fp16 BNSD: not in the package
        pkg.flash_attention_score(*(x.astype(np.float16) for x in (q, k, v)), **kw)
    assert e.value.code == 161002 and "fag_fwd_llvm_f16_d32_dv32_g2_band" in str(e.value)


def _tamper_byte(path):
    with open(path, "r+b") as f:
        f.seek(os.path.getsize(path) // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0xFF]))


@pytest.mark.parametrize("how", ["modified_library", "truncated_library", "library_is_folder", "missing_runtime",
                                 "bad_manifest_json", "binary_manifest", "manifest_is_folder", "manifest_list",
                                 "no_manifest"])
def test_tampered_package_refused(package, tmp_path, how):
    pkg = _copy(package, tmp_path)
    lib = _lib(pkg)
    man = os.path.join(pkg, "manifest.json")
    if how == "modified_library":
        _tamper_byte(lib)
    elif how == "truncated_library":
        with open(lib, "r+b") as f:
            f.truncate(os.path.getsize(lib) // 3)
    elif how == "library_is_folder":
        os.unlink(lib)
        os.mkdir(lib)
    elif how == "missing_runtime":
        os.unlink(os.path.join(pkg, "libtvm_runtime.so"))
    elif how == "bad_manifest_json":
        open(man, "w").write("{not json")
    elif how == "binary_manifest":
        open(man, "wb").write(bytes(range(256)))
    elif how == "manifest_is_folder":
        os.unlink(man)
        os.mkdir(man)
    elif how == "manifest_list":
        open(man, "w").write("[1, 2]")
    else:
        os.unlink(man)
    with pytest.raises(FagError) as e:
        fag_tvm.runtime.load(pkg)
    assert e.value.code == 161002 and "package" in str(e.value)


def test_threads_share_one_package(package):
    """8 threads calling one loaded package concurrently all get correct results."""
    pkg = fag_tvm.runtime.load(package)
    cases = [_inputs(10 + t, "BNSD" if t % 2 else "BSH") for t in range(8)]
    refs = [fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, **kw) for q, k, v, dy, kw in cases]
    results: list = [None] * 8
    errors = []

    def work(t):
        try:
            q, k, v, dy, kw = cases[t]
            for _ in range(3):
                results[t] = pkg.flash_attention_score_grad(q, k, v, dy, **kw)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=300)
    assert not errors, errors
    for t in range(8):
        tol = 2e-5 if cases[t][0].dtype == np.float32 else 5e-3
        for a, b in zip(results[t][:3], refs[t][:3]):
            assert rel_err(a, b) <= tol


_JIT = r"""
import numpy as np, fag_tvm
rng = np.random.default_rng(0)
q, k, v, dy = (rng.standard_normal((1, 3, 24, 8)).astype(np.float32) for _ in range(4))
g = fag_tvm.flash_attention_score_grad(q, k, v, dy, head_num=3, input_layout="BNSD", scale_value=0.3)
r = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, head_num=3, input_layout="BNSD", scale_value=0.3)
assert all(np.abs(a - b).max() < 1e-4 for a, b in zip(g[:3], r[:3]))
print("ok")
"""


def test_two_processes_compile_same_kernel(tmp_path):
    """The JIT disk cache: two processes building the same kernel at once both succeed, one file results."""
    env = dict(os.environ, FAG_TVM_CACHE=str(tmp_path / "cache"))
    procs = [subprocess.Popen([sys.executable, "-c", _JIT], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    files = [str(p.relative_to(tmp_path / "cache")) for p in (tmp_path / "cache").rglob("*") if p.is_file()]
    sos = [f for f in files if f.endswith(".so")]
    assert len(sos) == 2, sos  # forward (stats for A4) + backward, each compiled once
    assert all(f.startswith("llvm/") for f in sos), sos
    assert not [f for f in files if f.endswith(".tmp")], files


def test_aclnn_seed_example():
    """CANN's doc example: SBH, S=256, B=1, H=128 (head_num 1), fp16, sparse_mode 0, no mask."""
    from fag_tvm import aclnn

    rng = np.random.default_rng(7)
    S, B, H = 256, 1, 128
    q, k, v, dy = (rng.standard_normal((S, B, H)).astype(np.float16) for _ in range(4))
    f = fag_tvm.reference.flash_attention_score(q, k, v, head_num=1, input_layout="SBH", scale_value=H ** -0.5)
    dq, dk, dv = (np.full((S, B, H), np.nan, dtype=np.float16) for _ in range(3))
    st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(
        q, k, v, dy, None, None, None, None, f.softmax_max, f.softmax_sum, None, f.attention_out, None,
        H ** -0.5, 1.0, 65536, 65536, 1, "SBH", 0, 0, dq, dk, dv, None)
    assert st == 0 and ws > 0 and ex is not None
    assert aclnn.aclnnFlashAttentionScoreGrad(None, ws, ex) == 0
    r = fag_tvm.reference.flash_attention_score_grad(q, k, v, dy, head_num=1, input_layout="SBH",
                                                     scale_value=H ** -0.5, softmax_max=f.softmax_max,
                                                     softmax_sum=f.softmax_sum, attention_in=f.attention_out)
    for a, b in ((dq, r.dq), (dk, r.dk), (dv, r.dv)):
        assert rel_err(a, b) <= 5e-3
    assert aclnn.aclnnFlashAttentionScoreGrad(None, ws, ex) != 0  # an executor runs once


def test_aclnn_strict_nullptr_and_codes():
    from fag_tvm import aclnn

    rng = np.random.default_rng(1)
    q, k, v, dy = (rng.standard_normal((8, 1, 16)).astype(np.float32) for _ in range(4))
    f = fag_tvm.reference.flash_attention_score(q, k, v, head_num=1, input_layout="SBH")
    out = [np.empty_like(q) for _ in range(3)]
    base = [q, k, v, dy, None, None, None, None, f.softmax_max, f.softmax_sum, None, f.attention_out, None,
            1.0, 1.0, 65536, 65536, 1, "SBH", 0, 0, *out, None]
    for idx in (8, 9, 11, 21):  # softmax_max, softmax_sum, attention_in, dqOut
        args = list(base)
        args[idx] = None
        st, ws, ex = aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*args)
        assert st == 161001 and ex is None
    args = list(base)
    args[14] = 0.0  # keep_prob
    assert aclnn.aclnnFlashAttentionScoreGradGetWorkspaceSize(*args)[0] == 161002
