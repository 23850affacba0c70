"""AOT packages: compile every kernel a list of workloads needs, for one or more targets, into one
self-verifying folder (format: fag_tvm.core.manifest). Building needs the TVM compiler; loading
(fag_tvm.runtime) does not.

The folder is assembled in a temp dir beside `out_dir` and renamed into place. An existing `out_dir` is
replaced only if it is an earlier fag_tvm package (or with force=True); any other non-empty folder is
refused. Packages get the usual permissions (umask), not mkdtemp's private 0700."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from dataclasses import asdict
from typing import Any, Callable

from . import _tvm, targets
from .core.abi import kernel_spec
from .core.files import atomic_write_json, sha256_file
from .core.manifest import FORMAT, MANIFEST, read_manifest
from .core.spec import KernelSpec
from .errors import FagError, invalid
from .jit import knobs_for
from .version import __version__
from .workloads import configs


def specs_for(workloads: list[dict[str, Any]]) -> list[KernelSpec]:
    """The distinct kernel specialisations (forward and backward) a list of workloads needs."""
    out: list[KernelSpec] = []
    for w in workloads:
        fcfg, bcfg = configs(w)
        for spec in (kernel_spec(fcfg, "fwd"), kernel_spec(bcfg, "bwd")):
            if spec not in out:
                out.append(spec)
    return out


def _check_destination(out_dir: str, force: bool) -> None:
    if not os.path.lexists(out_dir):
        return
    if not os.path.isdir(out_dir) or os.path.islink(out_dir):
        raise invalid("out", f"{out_dir} exists and is not a folder")
    if force or not os.listdir(out_dir):
        return
    try:
        read_manifest(out_dir)
    except FagError:
        raise invalid("out", f"{out_dir} is a non-empty folder that is not a fag_tvm package; refusing to "
                      "replace it (choose another --out, or pass --force)") from None


def build_package(workloads: list[dict[str, Any]], out_dir: str, target_names: tuple[str, ...] = ("llvm",),
                  force: bool = False, log: Callable[[str], None] = lambda s: print(s, file=sys.stderr, flush=True)
                  ) -> dict:
    """Compile the kernels of `workloads` for every target in `target_names` into the package `out_dir`."""
    _check_destination(out_dir, force)
    specs = specs_for(workloads)
    parent = os.path.dirname(os.path.abspath(out_dir)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".fagpkg-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        artifacts, files = [], {}
        for tname in target_names:
            t = targets.get(tname)
            if not t.compiled:
                raise invalid("target", f"{tname} has no compiled kernels to package")
            hw = t.hw()
            lib = f"{t.name}-{t.hw_tag(hw)}{t.library_suffix}"
            entries, funcs = [], {}
            for i, spec in enumerate(specs):
                knobs, origin = knobs_for(t, spec, hw)
                fs = t.make_funcs(spec, knobs, hw)
                log(f"[{t.name} {i + 1}/{len(specs)}] {t.entry_name(spec, knobs, hw)} (knobs: {origin})")
                funcs.update(fs)
                entries.append({"entry": t.entry_name(spec, knobs, hw), "spec": asdict(spec), "knobs": asdict(knobs),
                                "knobs_origin": origin, "phases": list(t.phases(spec)),
                                "params": {ph: t.param_names(spec, ph) for ph in t.phases(spec)}})
            t0 = time.perf_counter()
            t.export(t.compile(funcs, hw), os.path.join(tmp, lib))
            log(f"[{t.name}] compiled {len(funcs)} kernels in {time.perf_counter() - t0:.1f} s")
            rt = {}
            for name, src in t.runtime_files().items():
                if name not in files:
                    shutil.copy2(src, os.path.join(tmp, name))
                rt[name] = name
            for name in [lib, *rt.values()]:
                p = os.path.join(tmp, name)
                files[name] = {"size": os.path.getsize(p), "sha256": sha256_file(p)}
            artifacts.append({"target": t.name, "hw": hw, "source_hash": t.source_hash(), "library": lib,
                              "runtime_files": rt, "kernels": entries})
        manifest = {"format": FORMAT, "fag_tvm_version": __version__, "tvm_version": _tvm.tvm_version(),
                    "tvm_ffi_version": _tvm.tvm_ffi_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "workloads": workloads, "artifacts": artifacts, "files": files}
        atomic_write_json(os.path.join(tmp, MANIFEST), manifest)
        if os.path.isdir(out_dir):
            old = tempfile.mkdtemp(prefix=".fagpkg-old-", dir=parent)
            os.replace(out_dir, os.path.join(old, "pkg"))
            os.replace(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out_dir)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    size = sum(os.path.getsize(os.path.join(out_dir, f)) for f in os.listdir(out_dir))
    n = sum(len(a["kernels"]) for a in manifest["artifacts"])
    log(f"package {out_dir}: {n} kernels, {size / 2**20:.1f} MiB")
    return manifest
