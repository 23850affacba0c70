"""Both cores are used by default: fag_tvm sets TVM's pool size to the usable core count (TVM alone would
use hardware_concurrency/2, i.e. one thread on a 2-core machine). Checked on TVM's pool itself: the worker
threads a kernel call starts (the process's threads before vs after the first parallel kernel call, NumPy's
own threads already started), with the default and with TVM_NUM_THREADS=1."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, os, numpy as np, fag_tvm
rng = np.random.default_rng(0)
q, k, v, dy = (rng.standard_normal((1, 4, 96, 16)).astype(np.float32) for _ in range(4))
from fag_tvm.core.abi import kernel_spec
from fag_tvm.config import validate
from fag_tvm import jit, targets
spec = kernel_spec(validate("fwd", q, k, v, head_num=4, input_layout="BNSD"), "fwd")
jit.kernel(targets.get("llvm"), spec)             # compile/load first: no kernel has run yet
before = len(os.listdir("/proc/self/task"))
fag_tvm.flash_attention_score(q, k, v, head_num=4, input_layout="BNSD")
after = len(os.listdir("/proc/self/task"))
print(json.dumps({"env": os.environ.get("TVM_NUM_THREADS"), "cores": len(os.sched_getaffinity(0)),
                  "pool_threads": after - before}))
"""


def _run(**env_extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True, capture_output=True,
                         text=True, timeout=600).stdout.strip().splitlines()[-1]
    return json.loads(out)


def test_default_thread_count_is_all_cores():
    r = _run()
    assert r["env"] == str(r["cores"])
    # TVM's pool: the calling thread + (cores - 1) workers started by the first parallel call
    assert r["pool_threads"] == r["cores"] - 1, r


def test_one_thread_starts_no_workers():
    r = _run(TVM_NUM_THREADS="1")
    assert r["env"] == "1" and r["pool_threads"] == 0, r
