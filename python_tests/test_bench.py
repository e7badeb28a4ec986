"""The benchmark scripts run (in --quick mode), so that they cannot rot.

They are timed nowhere here: speed is measured by running bench/ itself. These tests
check that every script finishes, prints its table and writes valid JSON whose rows
have positive times.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import treepool

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")


def run_script(name, *args, timeout=600):
    done = subprocess.run([sys.executable, os.path.join(BENCH, name), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not treepool.native_available(), reason="needs the native extension")
def test_bench_ops_quick(tmp_path):
    out = run_script("bench_ops.py", "--quick", "--repeats", "3", "--seconds", "0.5",
                     "--json", str(tmp_path / "ops.json"))
    assert "| tree_update | native |" in out and "copy bandwidth" in out
    data = json.loads((tmp_path / "ops.json").read_text())
    assert data["copy"]["copy_gbs"] > 0
    backends = {(r["op"], r["backend"]) for r in data["rows"]}
    assert {("tree_update", "native"), ("tree_update", "reference"),
            ("segment_mean", "native"), ("segment_mean", "torch.segment_reduce")} <= backends
    assert all(r["ms"] > 0 and r["gbs"] > 0 for r in data["rows"])


def test_bench_meta_quick(tmp_path):
    out = run_script("bench_meta.py", "--quick", "--repeats", "1",
                     "--json", str(tmp_path / "meta.json"), "--profile", str(tmp_path / "trace"))
    assert "| TreeMAML treepool |" in out and "| MAML loop |" in out
    data = json.loads((tmp_path / "meta.json").read_text())
    methods = {r["method"] for r in data["rows"]}
    assert {"TreeMAML treepool", "TreeMAML loop", "MAML treepool", "MAML loop", "MAML vmap"} <= methods
    assert all(r["ms"] > 0 for r in data["rows"])
    assert (tmp_path / "trace" / "bench_meta_treemaml.json").stat().st_size > 0


def test_bench_distributed_quick(tmp_path):
    out = run_script("bench_distributed.py", "--quick", "--json", str(tmp_path / "d.json"))
    data = json.loads((tmp_path / "d.json").read_text())
    by_level = {}
    for r in data["rows"]:
        by_level.setdefault(r["level"], {})[r["method"]] = r["bytes"]
    assert by_level and "naive all-reduce" in out
    for level, bytes_ in by_level.items():
        assert bytes_["treepool"] <= bytes_["naive all-reduce"], level
