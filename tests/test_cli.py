"""The `fag-tvm` command line: every subcommand has --help; info, compile and bench argument passing work."""
from __future__ import annotations

import json
import os

import pytest

from fag_tvm import cli


@pytest.mark.parametrize("cmd", ["info", "quickstart", "compile", "bench", "tune", "report"])
def test_subcommand_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage" in capsys.readouterr().out


def test_info_json(capsys):
    assert cli.main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["llvm_target"]["mcpu"] != "native" and info["threads"] >= 1


def test_compile_writes_a_loadable_package(tmp_path):
    wl = [{"B": 1, "N1": 2, "N2": 2, "Sq": 16, "Skv": 16, "D": 8, "Dv": 8, "input_layout": "BSND",
           "dtype": "fp32", "sparse_mode": 2}]
    path = tmp_path / "wl.json"
    path.write_text(json.dumps(wl))
    out = str(tmp_path / "pkg")
    assert cli.main(["compile", "--target", "llvm", "--workloads", str(path), "--out", out]) == 0
    assert sorted(os.listdir(out)) == ["kernels.so", "libtvm_runtime.so", "manifest.json"]
    import fag_tvm

    assert len(fag_tvm.runtime.load(out).kernel_names) == 2


def test_bad_workload_is_a_fag_error(tmp_path):
    import fag_tvm

    with pytest.raises(fag_tvm.FagError) as e:
        cli.main(["compile", "--workloads", '{"B": 1}', "--out", str(tmp_path / "p")])
    assert e.value.code == 161002 and "workload" in str(e.value)
