"""Per-target kernel source hash: what makes a compiled kernel, a package or a tuning record stale.

A target's hash covers its own kernel generators and schedule template (`Target.source_files()`) plus
the code every target shares: the ABI (core/spec.py, core/abi.py) and the target-independent math
(fag_tvm/kernels/common). Editing one target's files never changes another target's hash."""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Iterable

PKG_ROOT = Path(__file__).resolve().parent.parent  # the fag_tvm package folder


def common_sources() -> list[Path]:
    """Files every target's kernels depend on: the ABI and the shared TIR math."""
    core = PKG_ROOT / "core"
    return [core / "spec.py", core / "abi.py", *sorted((PKG_ROOT / "kernels" / "common").glob("*.py"))]


def hash_files(files: Iterable[Path]) -> str:
    """sha256 over (name relative to the package, content) of each file, in sorted order."""
    h = hashlib.sha256()
    for p in sorted({Path(f).resolve() for f in files}, key=_rel):
        h.update(_rel(p).encode())
        h.update(b"\0")
        h.update(p.read_bytes())
        h.update(b"\0")
    return h.hexdigest()


def _rel(p: Path) -> str:
    """Stable name of a source file: relative to the package (schedules/ is a sibling in a checkout
    and a subpackage when installed: both map to 'schedules/<file>')."""
    p = Path(p).resolve()
    for base in (PKG_ROOT, PKG_ROOT.parent):
        try:
            return p.relative_to(base).as_posix()
        except ValueError:
            continue
    return p.name


@functools.lru_cache(maxsize=None)
def _cached(files: tuple[str, ...]) -> str:
    return hash_files(Path(f) for f in files)


def source_hash(target_files: Iterable[Path]) -> str:
    """The source hash of a target given its own files (common sources added)."""
    files = tuple(sorted(str(Path(f).resolve()) for f in [*target_files, *common_sources()]))
    return _cached(files)
