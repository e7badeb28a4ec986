"""The benchmark scripts run (in --quick mode), so that they cannot rot.

They are timed nowhere here: speed is measured by running bench/ itself. These tests
check that every script finishes, prints its table and writes valid JSON whose rows
have positive times.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import treepool

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                     "bench")
sys.path.insert(0, BENCH)  # bench/ scripts and their modules, imported by the tests below
import baselines  # noqa: E402
import bench_meta  # noqa: E402
import treepool_adapter  # noqa: E402


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """The in-process checks here are small ops: one intra-op thread, as bench_meta uses
    (a second one made them 10-50x slower on a busy 2-core machine; conftest restores
    the count after each test)."""
    torch.set_num_threads(1)


def run_script(name, *args, timeout=600):
    done = subprocess.run([sys.executable, os.path.join(BENCH, name), *args],
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


@pytest.mark.skipif(not treepool.native_available(), reason="needs the native extension")
def test_bench_ops_quick(tmp_path):
    """bench_ops.py end to end, in a child process as from the command line, with its
    --quick configurations shrunk from P = 1e5..1e6 columns to 1e4 (both tree shapes):
    the same code runs, every op on every backend, in seconds instead of two minutes."""
    argv = ["--quick", "--repeats", "3", "--seconds", "0.5", "--json", str(tmp_path / "ops.json")]
    program = (f"import sys; sys.path.insert(0, {BENCH!r}); import bench_ops; "
               "bench_ops.configurations = lambda args: [(64, 8, 10**4, 'balanced'), "
               f"(64, 8, 10**4, 'skewed')]; bench_ops.main({argv!r})")
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| tree_update | native |" in out and "copy bandwidth" in out
    data = json.loads((tmp_path / "ops.json").read_text())
    assert data["copy"]["copy_gbs"] > 0
    backends = {(r["op"], r["backend"]) for r in data["rows"]}
    assert {("tree_update", "native"), ("tree_update", "reference"),
            ("segment_mean", "native"), ("segment_mean", "torch.segment_reduce")} <= backends
    assert all(r["ms"] > 0 and r["gbs"] > 0 for r in data["rows"])


# Tiny cells: the smoke run checks that the script, its interleaved timing and its report
# work end to end, in a few seconds; the figures come from running bench/ itself.
TINY_META = ["--quick", "--keep-grid", "--widths", "8", "--tasks", "8", "--shots", "3",
             "--conv-tasks", "4", "--conv-channels", "4", "--repeats", "1", "--min-time", "0",
             "--warmup", "1"]


def test_bench_meta_quick(tmp_path):
    out = run_script("bench_meta.py", *TINY_META, "--json", str(tmp_path / "meta.json"),
                     "--profile", str(tmp_path / "trace"))
    assert "| MLP 8 T=8 3-shot second |" in out and "x best baseline" in out
    assert "1 intra-op thread(s)" in out
    assert "\x1b" not in out  # no terminal escape codes when stdout is not a terminal
    data = json.loads((tmp_path / "meta.json").read_text())
    contenders = {(r["family"], r["contender"]) for r in data["rows"]}
    assert contenders == {(family, name) for family in ("MAML", "TreeMAML")
                          for name in ("treepool", "vmap", "loop")}
    assert {(r["net"], r["order"]) for r in data["rows"]} == {
        (n, o) for n in ("mlp", "conv") for o in ("second", "first")}
    assert all(0 < r["ms_min"] <= r["ms_median"] <= r["ms_max"] and r["ratio"] > 0
               for r in data["rows"])
    assert "page faults / step" in out
    if bench_meta.resource is not None:
        assert all(r["faults"] >= 0 for r in data["rows"])
    # The best baseline of each family is its own yardstick.
    assert all(r["ratio"] == 1.0 for r in data["rows"] if r["contender"] == r["best_baseline"])
    assert (tmp_path / "trace" / "bench_meta_treemaml.json").stat().st_size > 0


def test_bench_products_quick(tmp_path):
    out = run_script("bench_products.py", "--quick", "--json", str(tmp_path / "products.json"))
    assert "| leaf h B^T, w64 10-shot | nt |" in out and "treepool / torch" in out
    data = json.loads((tmp_path / "products.json").read_text())
    assert {r["form"] for r in data["rows"]} == {"nn", "nt", "tn", "nt_relu", "outer_relu"}
    assert all(r["treepool_us"] > 0 and r["torch_us"] > 0 and
               r["ratio_min"] <= r["ratio"] <= r["ratio_max"] for r in data["rows"])


def test_ab_meta_smoke():
    """ab_meta.py end to end on tiny cells: every switch, the forced in-place layers and a
    baseline; the figures come from running it on real cells."""
    out = run_script("ab_meta.py", "--cells", "mlp:8:8:3:first,conv:4:4:1:second",
                     "--off", "in-place,factored,written-out,relu-forms", "--force-in-place",
                     "--baseline", "loop", "--repeats", "1", "--min-time", "0")
    for label in ("MLP 8, T=8, 3-shot, first order, MAML:",
                  "conv 4ch, T=4, 1-shot, second order, TreeMAML:"):
        line = next(line for line in out.splitlines() if line.startswith(label))
        assert "as shipped" in line and "in-place off" in line and "loop baseline" in line
        assert "written-out off" in line and "relu-forms off" in line
        assert line.count("x, ") == 5  # a ratio for every contender but the reference
        if bench_meta.resource is not None:
            assert line.count(" faults/step)") == 6
    done = subprocess.run([sys.executable, os.path.join(BENCH, "ab_meta.py"), "--off", "jit"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "unknown ['jit']" in done.stderr


def test_bench_meta_threads_reach_the_timed_steps(monkeypatch, capsys):
    # Timing nothing: a stand-in for measure() records the thread setting it runs under.
    seen = []

    def fake_measure(entries, repeats, min_time, threads, warmup, progress):
        seen.append((threads, torch.get_num_threads()))
        return {c.key: {"number": 1, "times": [1e-3] * repeats} for c in entries}

    monkeypatch.setattr(bench_meta, "measure", fake_measure)
    bench_meta.main(TINY_META + ["--conv-tasks", "", "--orders", "first", "--threads", "2"])
    assert seen == [(2, 2)]
    assert "2 intra-op thread(s)" in capsys.readouterr().out


def test_bench_meta_keep_freed_memory_flag(monkeypatch, capsys):
    """--keep-freed-memory asks treepool.info to keep freed memory before any contender
    is built (here recorded, not done: the flag changes the whole process)."""
    from treepool import info

    events = []
    monkeypatch.setattr(info, "keep_freed_memory", lambda: events.append("keep") or True)
    real_contenders = bench_meta.contenders

    def contenders(*args):
        events.append("contenders")
        return real_contenders(*args)

    monkeypatch.setattr(bench_meta, "contenders", contenders)
    monkeypatch.setattr(bench_meta, "measure", lambda entries, repeats, *rest: {
        c.key: {"number": 1, "times": [1e-3] * repeats, "faults": []} for c in entries})
    argv = TINY_META + ["--conv-tasks", "", "--orders", "first"]
    bench_meta.main(argv)
    assert events == ["contenders"]
    events.clear()
    bench_meta.main(argv + ["--keep-freed-memory"])
    assert events == ["keep", "contenders"]
    capsys.readouterr()


@pytest.mark.skipif(bench_meta.resource is None, reason="no page-fault counts on this platform")
def test_bench_meta_counts_page_faults_per_step():
    """A step that touches 8 MiB of fresh anonymous memory faults about 2048 pages; one
    that allocates nothing, none (up to the timer's own noise)."""
    import mmap

    def touch():
        area = mmap.mmap(-1, 8 << 20)
        for i in range(0, len(area), mmap.PAGESIZE):
            area[i] = 1
        area.close()

    entries = [bench_meta.Contender("MAML", "touch", touch),
               bench_meta.Contender("MAML", "idle", lambda: None)]

    class Bar:
        def update(self, n):
            pass

    timed = bench_meta.measure(entries, repeats=2, min_time=0.0, threads=1, warmup=1,
                               progress=Bar())
    pages = (8 << 20) // mmap.PAGESIZE
    assert all(0.9 * pages <= f <= 1.5 * pages for f in timed["MAML touch"]["faults"])
    assert all(f < 0.05 * pages for f in timed["MAML idle"]["faults"])


def test_bench_meta_defaults_to_one_thread():
    args = bench_meta.parse_args([])
    assert args.threads == 1 and args.repeats >= 5
    # MLP widths x tasks x shots x orders, then the conv net's tasks x orders
    assert len(bench_meta.grid(args)) == 3 * 3 * 2 * 2 + 3 * 2


def test_bench_meta_interleaves_in_rotated_order():
    calls = []
    entries = [bench_meta.Contender("MAML", name, lambda name=name: calls.append(name))
               for name in ("a", "b", "c")]

    class Bar:
        def update(self, n):
            calls.append("|")

    timed = bench_meta.measure(entries, repeats=3, min_time=0.0, threads=1, warmup=1,
                               progress=Bar())
    # Timer runs a measurement's own warm-up steps just before it: collapse repeats.
    runs = [c for i, c in enumerate(calls) if i == 0 or calls[i - 1] != c]
    assert runs == ["a", "b", "c", "a", "b", "c", "|", "b", "c", "a", "|", "c", "a", "b", "|"]
    assert all(len(t["times"]) == 3 and t["number"] == 1 for t in timed.values())


def test_bench_distributed_quick(tmp_path):
    out = run_script("bench_distributed.py", "--quick", "--json", str(tmp_path / "d.json"))
    data = json.loads((tmp_path / "d.json").read_text())
    by_level = {}
    for r in data["rows"]:
        by_level.setdefault(r["level"], {})[r["method"]] = r["bytes"]
    assert by_level and "naive all-reduce" in out
    for level, bytes_ in by_level.items():
        assert bytes_["treepool"] <= bytes_["naive all-reduce"], level


# --------------------------------------------------------------------------- baselines
# bench_meta's ratios mean something only if every contender does the same work: each
# hand-written baseline's meta-gradient must equal treepool's (float64, tiny sizes).

LR, STEPS = 0.1, 3
TREES = {
    "balanced": baselines.balanced_labels(8, depth=3, branching=2),
    # equal-size clusters that are not contiguous blocks of task ids
    "interleaved": [[t % 2 for t in range(8)], [t % 4 for t in range(8)], list(range(8))],
    # unequal clusters: the vmap baseline falls back to its loop over clusters
    "unequal": [[0, 1, 0, 1, 1, 1, 0, 2], [0, 1, 0, 3, 3, 4, 5, 2], list(range(8))],
}


def tiny_problem(net):
    torch.manual_seed(0)
    if net == "mlp":
        return (baselines.mlp(6).double(), baselines.regression_batch(8, 3).to(torch.float64),
                torch.nn.functional.mse_loss)
    batch = baselines.classification_batch(8, ways=3, shots=1, queries=1, image=8)
    return (baselines.conv_net(ways=3, channels=3, layers=2, image=8).double(),
            batch.to(torch.float64), torch.nn.functional.cross_entropy)


def grads_of(model, loss):
    model.zero_grad(set_to_none=True)
    loss(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def treepool_grads(model, learner, batch):
    treepool_adapter.meta_loss(learner, batch).backward()
    return treepool_adapter.meta_grads(learner, model)


def assert_same(got, want):
    assert got.keys() == want.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_maml_baselines_match_treepool(net, first_order):
    model, batch, loss_fn = tiny_problem(net)
    want = treepool_grads(model, treepool_adapter.maml(copy.deepcopy(model), LR, STEPS, first_order,
                                                       loss_fn), batch)
    want = {n: want[n] for n, _ in model.named_parameters()}
    for loss in (baselines.vmap_maml_loss, baselines.loop_maml_loss):
        got = grads_of(copy.deepcopy(model),
                       lambda m: loss(m, batch, LR, STEPS, first_order, loss_fn))
        assert_same(got, want)


@pytest.mark.parametrize("first_order", [False, True], ids=["second", "first"])
@pytest.mark.parametrize("net, tree", [("mlp", t) for t in sorted(TREES)] + [("conv", "balanced")])
def test_tree_maml_baselines_match_treepool(net, tree, first_order):
    model, batch, loss_fn = tiny_problem(net)
    labels = TREES[tree]
    learner = treepool_adapter.tree_maml(copy.deepcopy(model), labels, LR, first_order, loss_fn)
    want = treepool_grads(model, learner, batch)
    levels = baselines.tree_levels(labels)
    for loss in (baselines.vmap_tree_maml_loss, baselines.loop_tree_maml_loss):
        got = grads_of(copy.deepcopy(model),
                       lambda m: loss(m, levels, batch, LR, first_order, loss_fn))
        assert_same(got, want)


def test_tree_levels_layout():
    balanced = baselines.tree_levels(baselines.balanced_labels(16, depth=3, branching=2))
    assert [lv.num_clusters for lv in balanced] == [2, 4, 16]
    assert all(lv.equal_sizes and lv.sorted_already for lv in balanced)
    assert balanced[1].parents == [0, 0, 1, 1]
    interleaved = baselines.tree_levels(TREES["interleaved"])
    assert not interleaved[0].sorted_already and interleaved[0].members[1] == [1, 3, 5, 7]
    assert interleaved[1].parents == [0, 1, 0, 1]
    assert not baselines.tree_levels(TREES["unequal"])[0].equal_sizes
