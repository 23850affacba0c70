"""The AOT package manifest: format, writing, and verification before any code is loaded (TVM-free).

    DIR/manifest.json     format, versions, workloads, one artifact per target, size + sha256 per file
    DIR/<library>         one shared library per artifact (target + hardware)
    DIR/<runtime files>   what the artifact's loader needs (libtvm_runtime.so for llvm)

The package is self-verifying: the loader trusts nothing in the manifest that it can derive. Every file
must be a regular file inside the package whose size and sha256 match; each kernel entry's symbol name
(compiled into the hash-checked library) spells out its spec, knobs and hardware, and must equal the
name derived from the manifest's spec/knobs/hw — so an edited `d`, `dv`, knob or `mcpu` is refused
instead of corrupting memory; argument lists and CPU requirements are derived, never read. Every
problem is a FagError (161002) naming what is wrong."""
from __future__ import annotations

import os
from typing import Any

from ..errors import FagError, invalid
from .files import read_bytes_regular, sha256_file
from .spec import KernelSpec

FORMAT = "fag_tvm-package/2"
MANIFEST = "manifest.json"
PINNED_TVM = "0.27.0.post1"


def refuse(rule: str) -> FagError:
    return invalid("package", rule)


def safe_member(root: str, name: Any) -> str:
    """Absolute path of package member `name`; refuses absolute paths, '..', and anything resolving outside."""
    if not isinstance(name, str) or not name or name.startswith(("/", "\\")) or "\\" in name or \
            any(part in ("", ".", "..") for part in name.split("/")):
        raise refuse(f"file name {name!r} is not a plain relative path inside the package")
    root_r = os.path.realpath(root)
    p = os.path.realpath(os.path.join(root_r, name))
    if os.path.commonpath([root_r, p]) != root_r:
        raise refuse(f"file {name!r} resolves outside the package")
    return p


def _require(m: dict, key: str, kind: type | tuple) -> Any:
    if key not in m:
        raise refuse(f"manifest field {key!r} is missing")
    v = m[key]
    if not isinstance(v, kind) or isinstance(v, bool) and kind is not bool:
        raise refuse(f"manifest field {key!r} has the wrong type ({type(v).__name__})")
    return v


def read_manifest(root: str) -> dict:
    import json

    path = os.path.join(root, MANIFEST)
    if not os.path.lexists(path):
        raise refuse(f"{path} not found (not a fag_tvm package)")
    data = read_bytes_regular(path, limit=64 << 20)
    if data is None:
        raise refuse(f"{path} is not a readable regular file")
    try:
        m = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise refuse(f"{path} is not valid JSON: {e}") from None
    if not isinstance(m, dict):
        raise refuse(f"{path} does not hold a JSON object")
    return m


def verify(root: str, fag_version: str, target_lookup) -> dict:
    """Check a package folder without loading code. Returns {"manifest", "artifacts": [verified artifact
    dicts with the resolved target, hw, file paths and kernels (spec, knobs, entry)]} or raises FagError.
    `target_lookup(name)` returns the registered Target (raises FagError for unknown names)."""
    from .. import _tvm

    m = read_manifest(root)
    fmt = m.get("format")
    if fmt != FORMAT:
        raise refuse(f"format {fmt!r} is not {FORMAT!r} (rebuild the package with this fag_tvm)")
    if _require(m, "fag_tvm_version", str) != fag_version:
        raise refuse(f"built by fag_tvm {m['fag_tvm_version']}, this is fag_tvm {fag_version}")
    if _require(m, "tvm_version", str) != PINNED_TVM:
        raise refuse(f"built with TVM {m['tvm_version']}, this fag_tvm needs TVM {PINNED_TVM}")
    if _require(m, "tvm_ffi_version", str) != _tvm.tvm_ffi_version():
        raise refuse(f"built with tvm-ffi {m['tvm_ffi_version']}, this is tvm-ffi {_tvm.tvm_ffi_version()}")
    files = _require(m, "files", dict)
    checked = {}
    for name, rec in files.items():
        p = safe_member(root, name)
        if not isinstance(rec, dict) or not isinstance(rec.get("sha256"), str) or \
                not isinstance(rec.get("size"), int):
            raise refuse(f"manifest entry of file {name!r} needs 'size' and 'sha256'")
        if not os.path.lexists(p):
            raise refuse(f"file {name} is missing")
        if os.path.islink(p) or not os.path.isfile(p):
            raise refuse(f"file {name} is not a regular file")
        if os.path.getsize(p) != rec["size"]:
            raise refuse(f"file {name} has {os.path.getsize(p)} bytes, the manifest says {rec['size']} "
                         "(truncated or replaced)")
        if sha256_file(p) != rec["sha256"]:
            raise refuse(f"file {name} does not match its sha256 in the manifest (modified)")
        checked[name] = p
    arts = _require(m, "artifacts", list)
    if not arts:
        raise refuse("manifest lists no artifacts")
    out = []
    for i, a in enumerate(arts):
        if not isinstance(a, dict):
            raise refuse(f"artifact #{i} is not a JSON object")
        tname = _require(a, "target", str)
        t = target_lookup(tname)
        hw = _require(a, "hw", dict)
        why = t.host_check(hw)
        if why:
            raise refuse(f"artifact {tname}: " + "; ".join(why))
        if _require(a, "source_hash", str) != t.source_hash():
            raise refuse(f"artifact {tname}: kernel source hash differs from this fag_tvm's {tname} kernels "
                         "(rebuild the package)")
        lib = _require(a, "library", str)
        if lib not in checked:
            raise refuse(f"artifact {tname}: library {lib!r} is not among the hashed files")
        rt = _require(a, "runtime_files", dict)
        for k, v in rt.items():
            if v not in checked:
                raise refuse(f"artifact {tname}: runtime file {v!r} is not among the hashed files")
        kernels = []
        for j, e in enumerate(_require(a, "kernels", list)):
            if not isinstance(e, dict):
                raise refuse(f"artifact {tname}: kernel #{j} is not a JSON object")
            entry = _require(e, "entry", str)
            try:
                spec = KernelSpec.from_dict(e.get("spec"))
                knobs = t.knobs_from_dict(e.get("knobs"))
            except (TypeError, ValueError) as exc:
                raise refuse(f"kernel {entry}: {exc}") from None
            derived = t.entry_name(spec, knobs, hw)
            if derived != entry:
                raise refuse(f"kernel {entry}: the manifest's spec/knobs/hw describe {derived} (edited manifest)")
            kernels.append({"entry": entry, "spec": spec, "knobs": knobs})
        out.append({"target": t, "hw": hw, "library": checked[lib],
                    "runtime_files": {k: checked[v] for k, v in rt.items()}, "kernels": kernels})
    return {"manifest": m, "artifacts": out}
