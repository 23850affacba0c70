"""Building tuning candidates: meta-schedule's LocalBuilder workers turn an annotated stub into the REAL
kernel of the target for those knobs (`Target.make_funcs` + `compile`) and export it as a library whose
file name carries the knob tag (the runner side journals by it). State travels in the return value of
f_build, never in module globals."""
from __future__ import annotations

import os
import tempfile
from typing import Any, NamedTuple

from .records import knobs_tag
from .task import ENTRY, spec_of, task_of_mod


class Built(NamedTuple):
    executable: Any
    tag: str


def ms_build(mod, target, params) -> Built:
    """f_build: the scheduled stub -> the target's kernel for the annotated knobs, compiled; the main
    entry is exported as ENTRY (the runner times that name)."""
    from .. import targets
    from .space import knobs_of_mod

    task = task_of_mod(mod)
    if task is None:
        raise ValueError("not a fag_tvm tuning stub (no task attribute)")
    t = targets.get(task["target"])
    knobs = knobs_of_mod(t, mod)
    if knobs is None:
        raise ValueError("tuning stub without knob annotations")
    spec, hw = spec_of(task), task["hw"]
    funcs = t.make_funcs(spec, knobs, hw)
    main = t.entry_name(spec, knobs, hw)
    funcs = {(ENTRY if n == main else n): (f.with_attr("global_symbol", ENTRY) if n == main else f)
             for n, f in funcs.items()}
    return Built(t.compile(funcs, hw), knobs_tag(knobs))


def ms_export(out_dir: str, built: Built) -> str:
    """f_export: a shared library (loadable locally and by an RPC server); the knob tag in its name."""
    d = tempfile.mkdtemp(prefix="b", dir=out_dir)
    path = os.path.join(d, built.tag + ".so")
    built.executable.export_library(path)
    return path


def tag_of_artifact(path: str) -> str:
    return os.path.splitext(os.path.basename(str(path)))[0]
