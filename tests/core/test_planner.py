"""ChunkPlanner on synthetic timings: robustness to outliers, caps, cost of exploring, sync.

(The basic settling behaviour is tested in test_autograd.py.)
"""

import math
import time

import pytest
import torch

from torch_secorder import batched_hvp
from torch_secorder.core import _autograd
from torch_secorder.core._autograd import ChunkPlanner, GradientGraph

CPU = torch.device("cpu")


def run(planner, seconds, count):
    """Run ``count`` products in chunks as product_chunks does; return (sizes, total time)."""
    sizes, total, done = [], 0.0, 0
    while done < count:
        size = min(planner.next_size(), count - done)
        cost = seconds(size)
        planner.record(size, cost)
        sizes.append(size)
        total += cost
        done += size
    return sizes, total


def test_one_slow_outlier_does_not_end_the_search():
    spikes = iter([20.0])  # the first chunk of 4 is hit by a load spike, once

    def seconds(size):
        return next(spikes, 1.0) if size == 4 else 1.0

    planner = ChunkPlanner(64, CPU)
    sizes, _ = run(planner, seconds, 400)
    assert sizes[:8] == [1, 1, 2, 4, 4, 8, 16, 32]
    assert planner.settled
    assert set(sizes[8:-1]) == {64}


def test_a_trial_slower_twice_settles_on_the_best_size():
    planner = ChunkPlanner(64, CPU)
    sizes, _ = run(planner, lambda size: 1.0 if size < 8 else 2.0 * size, 100)
    # per product: 1 (single), 1/2, 1/4, then 2 at size 8 (timed twice): back to 4
    assert sizes[:7] == [1, 1, 2, 4, 8, 8, 4]
    assert set(sizes[7:-1]) == {4}


def test_trials_stop_at_the_cap():
    planner = ChunkPlanner(12, CPU)
    sizes, _ = run(planner, lambda size: 1.0, 200)
    assert sizes[:6] == [1, 1, 2, 4, 8, 12]
    assert planner.settled
    assert set(sizes[5:-1]) == {12}


def test_a_plateau_ends_the_search_without_a_second_timing():
    # per product: each doubling gains less than 10% from 4 on, after a gentle start
    per_product = {1: 1.0, 2: 0.9, 4: 0.85, 8: 0.84}
    planner = ChunkPlanner(64, CPU)
    sizes, _ = run(planner, lambda size: size * per_product[size], 40)
    assert planner.settled
    assert sizes[:4] == [1, 1, 2, 4]
    assert planner.best_size == 4
    assert set(sizes[4:-1]) == {4}


@pytest.mark.parametrize("slowdown", [1.5, 2.0, 3.0])
@pytest.mark.parametrize("count", [32, 128])
def test_exploring_costs_a_few_products_when_batching_loses(slowdown, count):
    planner = ChunkPlanner(64, CPU)
    sizes, total = run(planner, lambda size: slowdown * size if size > 1 else 1.0, count)
    loop = float(count)
    # two trial chunks of 2 products, each product `slowdown` times a single one
    assert total == pytest.approx(loop + 2 * 2 * (slowdown - 1))
    assert sizes[-1] == 1


def test_exploring_costs_a_few_calls_when_batching_pays():
    planner = ChunkPlanner(64, CPU)
    sizes, total = run(planner, lambda size: 1.0, 1000)  # every call costs the same
    best = math.ceil(1000 / 64)  # calls of the largest chunk allowed
    assert len(sizes) == total
    assert total <= best + 8  # two singles and the trials 2, 4, ..., 32


def test_cuda_is_synchronised_only_while_exploring(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: calls.append(1))
    planner = ChunkPlanner(4, torch.device("cuda", 0))
    assert planner.sync
    steps = 0
    while not planner.settled:
        size = planner.next_size()
        tic = planner.clock()
        planner.record(size, planner.elapsed(tic) + 1.0)
        steps += 1
    assert len(calls) == 2 * steps
    planner.clock()
    assert len(calls) == 2 * steps


def test_saved_bytes_counts_what_the_graph_saved_once_per_storage():
    x = torch.ones(1000, dtype=torch.float64, requires_grad=True)
    graph = GradientGraph(lambda: x.exp().sum(), [x], fname="t")
    # exp saves its result (8000 bytes); the gradient exp(x) * 1 saves it again (same
    # storage) and the gradient graph's own saved tensors are of the same size at most
    assert 8000 <= graph.saved_bytes <= 3 * 8000
    assert graph.memory_cap([x]) == _autograd.CHUNK_MEMORY_BYTES // (graph.saved_bytes + 16000)
    linear = GradientGraph(lambda: (2 * x).sum(), [x], fname="t")
    assert linear.saved_bytes == 0  # nothing saved: a constant gradient


def test_saved_bytes_counts_custom_functions():
    class Cube(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return x**3

        @staticmethod
        def backward(ctx, grad):
            (x,) = ctx.saved_tensors
            return 3 * x**2 * grad

    x = torch.ones(500, dtype=torch.float64, requires_grad=True)
    graph = GradientGraph(lambda: Cube.apply(x).sum(), [x], fname="t")
    assert graph.saved_bytes >= 4000


def test_cpu_time_is_the_measure_when_the_process_is_preempted(monkeypatch):
    # a product of 1 ms of CPU work that waits 10 ms for the CPU (a loaded machine)
    now = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: now["wall"])
    monkeypatch.setattr(time, "process_time", lambda: now["cpu"])
    planner = ChunkPlanner(8, CPU)
    tic = planner.clock()
    now["wall"] += 0.011
    now["cpu"] += 0.001
    assert planner.elapsed(tic) == pytest.approx(0.001)
    # several threads: CPU time exceeds wall-clock time, which is what counts
    tic = planner.clock()
    now["wall"] += 0.001
    now["cpu"] += 0.004
    assert planner.elapsed(tic) == pytest.approx(0.001)


def test_cuda_time_is_wall_clock(monkeypatch):
    now = {"wall": 0.0, "cpu": 0.0}
    monkeypatch.setattr(time, "perf_counter", lambda: now["wall"])
    monkeypatch.setattr(time, "process_time", lambda: now["cpu"])
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    planner = ChunkPlanner(8, torch.device("cuda", 0))
    tic = planner.clock()
    now["wall"] += 0.003  # the GPU worked; the CPU waited
    now["cpu"] += 0.0001
    assert planner.elapsed(tic) == pytest.approx(0.003)


# ----------------------------------------------------------------------------- shared planners


@pytest.fixture
def fresh_shared(monkeypatch):
    shared = {}
    monkeypatch.setattr(ChunkPlanner, "_shared", shared)
    return shared


def test_shared_planner_is_kept_per_key(fresh_shared):
    a = ChunkPlanner.shared("a", 64, CPU)
    assert ChunkPlanner.shared("a", 64, CPU) is a
    b = ChunkPlanner.shared("b", 64, CPU)
    assert b is not a
    assert a.uses == 2
    assert b.uses == 1


def test_shared_planner_resumes_and_then_stays_settled(fresh_shared):
    first, _ = run(ChunkPlanner.shared("k", 64, CPU), lambda size: 1.0, 8)  # a short call
    assert first == [1, 1, 2, 4]
    second, _ = run(ChunkPlanner.shared("k", 64, CPU), lambda size: 1.0, 200)
    assert second[:4] == [8, 16, 32, 64]  # the search goes on where it stopped
    third, _ = run(ChunkPlanner.shared("k", 64, CPU), lambda size: 1.0, 128)
    assert third == [64, 64]  # settled: no trials at all


def test_shared_planner_tries_the_next_size_again_at_its_second_call(fresh_shared):
    slow_eight = {8: 0.5}  # the first call's chunks of 8 ran on a loaded machine
    first, _ = run(ChunkPlanner.shared("k", 64, CPU), lambda s: s * slow_eight.get(s, 1 / s), 40)
    assert first[:7] == [1, 1, 2, 4, 8, 8, 4]  # settled on 4
    second, _ = run(ChunkPlanner.shared("k", 64, CPU), lambda s: 1.0, 200)
    assert second[:4] == [8, 16, 32, 64]  # 8 is faster now: the search goes on
    planner = ChunkPlanner.shared("k", 64, CPU)
    assert planner.settled
    assert planner.best_size == 64


def test_shared_planner_at_its_best_is_not_disturbed(fresh_shared):
    per_product = {1: 1.0, 2: 0.5, 4: 0.25, 8: 0.5}
    for call in range(1, 8):
        sizes, _ = run(ChunkPlanner.shared("k", 64, CPU), lambda s: s * per_product[s], 40)
        if call in (2, 4):  # one more trial of 8, slower: back to 4
            assert sizes[:2] == [8, 4]
        elif call > 1:
            assert set(sizes[:-1]) == {4}


def test_shared_planner_is_renewed_after_its_reuses(fresh_shared):
    planner = ChunkPlanner.shared("k", 64, CPU)
    for _ in range(ChunkPlanner.REUSES - 1):
        assert ChunkPlanner.shared("k", 64, CPU) is planner
    renewed = ChunkPlanner.shared("k", 64, CPU)
    assert renewed is not planner
    assert renewed.uses == 1


def test_shared_planners_are_bounded(fresh_shared):
    for key in range(ChunkPlanner.SHARED + 5):
        ChunkPlanner.shared(key, 8, CPU)
    assert len(fresh_shared) == ChunkPlanner.SHARED
    assert 0 not in fresh_shared  # the least recently used went first
    assert ChunkPlanner.SHARED + 4 in fresh_shared


def test_products_of_one_kind_share_a_planner(fresh_shared):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    model = model.double()
    x = torch.randn(5, 3, dtype=torch.float64)
    params = list(model.parameters())
    vs = torch.randn(6, sum(p.numel() for p in params), dtype=torch.float64)

    def loss(inputs):
        return lambda: model(inputs).pow(2).mean()

    first = batched_hvp(loss(x), params, vs)
    assert len(fresh_shared) == 1
    (planner,) = fresh_shared.values()
    second = batched_hvp(loss(x), params, vs)
    assert list(fresh_shared.values()) == [planner]
    assert planner.uses == 2
    torch.testing.assert_close(second, first)
    batched_hvp(loss(torch.cat([x, x])), params, vs)  # a larger batch: another kind
    assert len(fresh_shared) == 2
    batched_hvp(loss(x), params, vs, chunk_size=2)  # a fixed chunk size needs no planner
    assert planner.uses == 2


def test_near_ties_go_to_the_smaller_chunk():
    # seconds per product by chunk size: 8 is the fastest, 4 within 5% of it
    per_product = {1: 1.0, 2: 0.5, 4: 0.25, 8: 0.245}
    planner = ChunkPlanner(64, CPU)
    sizes, _ = run(planner, lambda size: size * per_product[size], 100)
    assert planner.settled
    assert planner.best_size == 4
    assert sizes[:7] == [1, 1, 2, 4, 8, 8, 4]
    assert set(sizes[6:-1]) == {4}


def test_a_slightly_slower_chunk_of_two_does_not_end_the_search():
    # per product: singles 1, a chunk of 2 costs 15% more, larger chunks 30% less
    planner = ChunkPlanner(64, CPU)
    sizes, _ = run(planner, lambda size: size * {1: 1.0, 2: 1.15}.get(size, 0.7), 200)
    assert sizes[:7] == [1, 1, 2, 4, 8, 8, 4]
    assert planner.best_size == 4
