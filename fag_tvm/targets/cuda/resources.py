"""`python -m fag_tvm.targets.cuda.resources`: nvcc's verdict on the default CUDA schedule of a representative
list (every feature on, D = 64 / 128 / 256, fp32 / fp16 / bf16) for sm_80 and sm_90 -- registers, spills and
stack per kernel from `ptxas -v`, and the dynamic shared memory the kernels declare -- as a table + JSON."""
from __future__ import annotations

import argparse
import json
import sys

from ...core.spec import KernelSpec
from ...schedules import cuda as sc
from . import nvcc
from .bwd import make_phases

CASES = ((64, "bfloat16"), (128, "float16"), (128, "float32"), (256, "float32"))
HEAVY = dict(direction="bwd", group=2, band=True, full_mask=True, pse="ext", pse_add_first=False, dropout=True,
             dpse=True, dpse_sum_b=False)


def measure(archs=("sm_80", "sm_90"), cases=CASES) -> list[dict]:
    rows = []
    for arch in archs:
        for d, dtype in cases:
            spec = KernelSpec(dtype=dtype, d=d, dv=d, **HEAVY)
            k = sc.default_knobs(spec, arch)
            res = nvcc.ptxas_resources(nvcc.cuda_source(make_phases(spec, k, "shared.dyn", "r"), arch), arch)
            for name, r in sorted(res.items()):
                rows.append(dict(arch=arch, d=d, dtype=dtype, knobs=k.tag(), kernel=name.split("_")[1],
                                 smem_dyn_bytes=4 * sc.smem_floats(spec, k, "dkdv") if "_pre" not in name
                                 and "_post" not in name else 4 * k.threads, **r))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="also write the rows here")
    a = ap.parse_args(argv)
    if nvcc.nvcc_path() is None:
        print("nvcc not found", file=sys.stderr)
        return 2
    rows = measure()
    print(f"{'arch':6} {'D':>4} {'dtype':9} {'schedule':26} {'kernel':6} {'regs':>4} {'spill B':>7} {'stack':>5} "
          f"{'smem KiB':>8}")
    for r in rows:
        print(f"{r['arch']:6} {r['d']:>4} {r['dtype']:9} {r['knobs']:26} {r['kernel']:6} {r['registers']:>4} "
              f"{r['spill_stores']:>7} {r['stack']:>5} {r['smem_dyn_bytes'] / 1024:>8.1f}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
