"""`python -m treepool demo --quick`: the main job in a tiny configuration."""

from __future__ import annotations

import io
import subprocess
import sys

import torch

from treepool.demo import DemoConfig, FamilyConfig, HierarchicalRegression, format_table, run_demo


def test_family_is_hierarchical():
    fam = HierarchicalRegression(FamilyConfig(branching=(2, 3, 2), shots=4, queries=6))
    assert fam.num_tasks == 12 and fam.tree.depth == 3 and fam.tree.clusters_per_level == [2, 6, 12]
    g = torch.Generator().manual_seed(0)
    v = fam.coefficients(g)
    # siblings share more of their function than cousins
    d_sib = (v[0] - v[1]).norm()
    d_far = (v[0] - v[6]).norm()
    assert v.shape == (12, 4) and d_sib < d_far
    b = fam.sample(g)
    assert b["support_x"].shape == (12, 4, 1) and b["query_y"].shape == (12, 6, 1)
    assert not torch.equal(b["query_y"], b["query_clean"])


class _Terminal(io.StringIO):
    """A stream that says it is a terminal, so that tqdm draws its bar into it."""

    def isatty(self):
        return True


def test_run_demo_small():
    cfg = DemoConfig(steps=3, seeds=2, hidden=8, eval_batches=1, curve_points=1,
                     family=FamilyConfig(branching=(2, 2, 2)))
    out = _Terminal()
    res = run_demo(cfg, progress=out)
    assert set(res) == {"MAML", "TreeMAML", "Learned TreeMAML", "Reptile"}
    for r in res.values():
        assert len(r["final"]) == 2 and all(v > 0 for v in r["final"]) and len(r["ms"]) == 2
        assert r["curves"][0][0][0] == 0 and r["curves"][0][-1][0] == 3
    # one bar over methods x seeds x steps, ending on the last method and seed
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert "Reptile seed 2/2" in last and "24/24" in last and "train query loss" in last
    table = format_table(res, cfg)
    assert "TreeMAML" in table and "ms / meta-step" in table


def test_cli_quick(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "treepool", "demo", "--quick", "--seeds", "1",
                           "--plot", str(tmp_path / "curves.png")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for name in ("MAML", "TreeMAML", "Learned TreeMAML", "Reptile", "final query MSE", "total wall time",
                 "CPU allocator"):
        assert name in proc.stdout
    # stderr is a pipe here, not a terminal: no progress bar, no escape codes
    assert "\r" not in proc.stderr and "\x1b" not in proc.stderr and "step" not in proc.stderr
    assert ("learning curves written" in proc.stdout) == (tmp_path / "curves.png").exists()
