"""The example scripts under examples/ run in their quick mode (as the README shows them)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLES = os.path.join(ROOT, "examples")


def run_example(*args, timeout=120):
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def number_after(text: str, label: str) -> float:
    line = next(line for line in text.splitlines() if line.startswith(label))
    return float(line[len(label):].split()[0])


def test_sine_maml_quick():
    out = run_example(os.path.join(EXAMPLES, "sine_maml.py"), "--quick")
    for label in ("query MSE before meta-training:", "query MSE after meta-training:",
                  "query MSE after adapt(steps=10):"):
        value = number_after(out, label)
        assert value == value and 0 <= value < 50, (label, out)


@pytest.mark.parametrize("method", ["maml", "treemaml"])
def test_omniglot_conv_quick(method):
    out = run_example(os.path.join(EXAMPLES, "omniglot_conv.py"), "--quick", "--method", method)
    for label in ("meta-test accuracy before meta-training:", "meta-test accuracy after meta-training:",
                  "meta-test accuracy after adapt(steps=5):"):
        assert 0.0 <= number_after(out, label) <= 1.0, (label, out)
    assert "BatchNorm running statistics untouched: True" in out


def test_examples_importable_main():
    """main(argv) returns the figures (for notebooks and the tests)."""
    sys.path.insert(0, EXAMPLES)
    try:
        import sine_maml
        result = sine_maml.main(["--quick"])
    finally:
        sys.path.remove(EXAMPLES)
    assert set(result) == {"before", "after", "adapt10"}
