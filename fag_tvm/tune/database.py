"""The tuning database of one kernel family, read WITHOUT TVM, plus the crash-safe journal.

Files (meta-schedule's JSONDatabase format, one JSON value per line):
    database_workload.json        ["<structural hash>", "<base64 of the workload IRModule>"]
    database_tuning_record.json   [workload index, [trace, run_secs, target, args_info]]
    journal.jsonl                 each measurement, fsync-appended the moment it finishes

The workload module is the tuning stub (fag_tvm.tune.task) whose function attribute carries the task
identity as a JSON string; the trace's SampleCategorical decisions + Annotate instructions carry the
knob values. Both are decoded here from the JSON text, so `fag-tvm report`, `tune --check` and the build
path read records without importing the TVM compiler. Writing goes through TVM (fag_tvm.tune.driver)."""
from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from ..core.files import append_json_line, atomic_write_text, read_bytes_regular, read_json_lines
from .codes import knobs_from_codes
from .task import ANN, FORMAT

DB_WORKLOAD = "database_workload.json"
DB_RECORD = "database_tuning_record.json"
JOURNAL = "journal.jsonl"
FAILED_SECS = 1e10


def decode_task(workload_line: Any) -> tuple[str, dict] | None:
    """(structural hash, task identity) of one database_workload.json line, or None if not ours."""
    try:
        shash, blob = str(workload_line[0]), base64.b64decode(workload_line[1])
        graph = json.loads(blob[8:].decode())  # 8-byte length prefix, then TVM's JSON node graph
    except (ValueError, TypeError, IndexError, UnicodeDecodeError):
        return None
    for node in graph.get("nodes", []) if isinstance(graph, dict) else []:
        data = node.get("data") if isinstance(node, dict) else None
        if node.get("type") == "ffi.String" and isinstance(data, str) and FORMAT in data and data.startswith("{"):
            try:
                task = json.loads(data)
            except ValueError:
                continue
            if isinstance(task, dict) and task.get("format") == FORMAT:
                return shash, task
    return None


def decode_knob_values(trace: Any) -> dict[str, int] | None:
    """{knob name: value} from a trace in JSON form ([instructions, decisions]), or None."""
    try:
        insts, decisions = trace
        dec = {int(i): int(d) for i, d in decisions}
        values: dict[str, Any] = {}
        out: dict[str, int] = {}
        for idx, (kind, inputs, attrs, outputs) in enumerate(insts):
            if kind == "SampleCategorical":
                values[outputs[0]] = attrs[0][dec.get(idx, 0)]
            elif kind == "Annotate" and str(attrs[0]).startswith(ANN):
                v = inputs[1]
                out[str(attrs[0])[len(ANN):]] = int(values[v] if isinstance(v, str) else v)
        return out
    except (ValueError, TypeError, KeyError, IndexError):
        return None


def read_family(fdir: Path, knobs_from: Any) -> list[dict]:
    """Per workload of a family database: {"task", "shash", "records": [{"knobs", "run_secs", "ok"}]},
    records in measurement (file) order. `knobs_from` is the target (its knobs decoded from the trace's integers
    by tune.codes) or a function of the decoded integers; values that do not fit are skipped."""
    decode = (lambda task, vals: knobs_from_codes(knobs_from, task, vals)) if hasattr(knobs_from, "schedule") \
        else (lambda task, vals: knobs_from(vals))
    wls: list[dict | None] = []
    for line in read_json_lines(Path(fdir) / DB_WORKLOAD):
        d = decode_task(line)
        wls.append(None if d is None else {"shash": d[0], "task": d[1], "records": []})
    for line in read_json_lines(Path(fdir) / DB_RECORD):
        try:
            ent = wls[int(line[0])]
            trace, run_secs = line[1][0], line[1][1]
        except (ValueError, IndexError, TypeError):
            continue
        if ent is None:
            continue
        vals = decode_knob_values(trace)
        try:
            knobs = decode(ent["task"], vals) if vals is not None else None
        except (ValueError, TypeError, IndexError, KeyError):
            knobs = None
        if knobs is None:
            continue
        secs = [float(x) for x in (run_secs or [])]
        ok = bool(secs) and all(s < FAILED_SECS for s in secs)
        ent["records"].append({"knobs": knobs, "run_secs": secs, "ok": ok})
    return [e for e in wls if e is not None]


def repair_json_lines(path: Path) -> int:
    """Drop torn/unparseable lines (a SIGKILL during an append) so TVM's JSONDatabase can load the
    file; rewritten atomically. Returns the number of dropped lines."""
    data = read_bytes_regular(path)
    if not data:
        return 0
    good, bad = [], 0
    for raw in data.split(b"\n"):
        if not raw.strip():
            continue
        try:
            json.loads(raw)
            good.append(raw)
        except ValueError:
            bad += 1
    if bad or not data.endswith(b"\n"):
        atomic_write_text(path, "".join(x.decode() + "\n" for x in good))
    return bad


def journal_append(fdir: Path, entry: dict) -> None:
    append_json_line(Path(fdir) / JOURNAL, entry)


def journal_read(fdir: Path) -> list[dict]:
    return [j for j in read_json_lines(Path(fdir) / JOURNAL) if isinstance(j, dict)]
