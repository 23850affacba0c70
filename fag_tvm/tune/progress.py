"""The tuning progress bar (tqdm): trials done, best and last throughput, the knobs that gave them."""
from __future__ import annotations

import sys
from typing import Any

import numpy as np
from tqdm import tqdm


class Progress:
    """One bar per tuned workload; `update` after each measurement (None secs: a failed trial)."""

    def __init__(self, label: str, total: int, done: int, flops: float, enabled: bool = True, stream: Any = None):
        self.flops = flops
        self.best: tuple[float, Any] | None = None
        self.bar = tqdm(total=total, initial=min(done, total), desc=f"tune {label}", unit="trial",
                        file=stream or sys.stderr, disable=not enabled, dynamic_ncols=True, leave=True)

    def seed_best(self, secs: float | None, knobs: Any) -> None:
        if secs is not None and (self.best is None or secs < self.best[0]):
            self.best = (secs, knobs)

    def update(self, knobs: Any, secs: list[float] | None, err: str | None) -> None:
        if secs:
            self.seed_best(float(np.median(secs)), knobs)
        best = f"{self.flops / self.best[0] / 1e9:.1f} GFLOP/s {self.best[1].tag()}" if self.best else "-"
        last = (f"{self.flops / float(np.median(secs)) / 1e9:.1f} {knobs.tag() if knobs else '?'}" if secs
                else f"FAILED ({(err or '').strip().splitlines()[-1][:60] if err else ''})")
        self.bar.set_postfix_str(f"best {best} | last {last}", refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()
