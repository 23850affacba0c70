"""Both cores are used by default: fag_tvm sets TVM's pool size to the usable core count (TVM alone
would use hardware_concurrency/2, i.e. one thread on this 2-core machine)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

_CHILD = r"""
import json, os, numpy as np, fag_tvm
rng = np.random.default_rng(0)
q, k, v, dy = (rng.standard_normal((1, 4, 96, 16)).astype(np.float32) for _ in range(4))
fag_tvm.flash_attention_score_grad(q, k, v, dy, head_num=4, input_layout="BNSD")
print(json.dumps({"env": os.environ.get("TVM_NUM_THREADS"), "cores": len(os.sched_getaffinity(0)),
                  "os_threads": len(os.listdir("/proc/self/task"))}))
"""


def test_default_thread_count_is_all_cores():
    env = {k: v for k, v in os.environ.items() if k != "TVM_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", _CHILD], env=env, check=True, capture_output=True,
                         text=True).stdout.strip().splitlines()[-1]
    r = json.loads(out)
    assert r["env"] == str(r["cores"])
    if r["cores"] >= 2:  # the pool's worker threads exist (main thread + workers)
        assert r["os_threads"] >= 2, r
