"""The engine: one gradient graph per call, chunked and batched products, the loop fallback,
unit cotangents, the memory cap, the fixed chunk rule and the batching engines."""

import gc
import warnings
import weakref

import pytest
import torch
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import CASES, build, case_by_id
from tests.core.helpers import CALLS, CLOSURE_FORMS, Recorder, like, tensors_of
from torch_secorder import (
    batched_hvp,
    hessian_diagonal,
    hessian_matrix,
    hvp,
    model_top_eigenvalues,
    output_hessian_matrix,
)
from torch_secorder.core import _autograd, _chunks
from torch_secorder.core._autograd import GradientGraph, unit_cotangents

F64 = torch.float64


# ----------------------------------------------------------------------------- one graph per call


@pytest.mark.parametrize("name", CLOSURE_FORMS)
def test_each_call_evaluates_the_loss_once(name):
    built = build(case_by_id("mlp-tanh-ce"))
    built.func = Recorder(built.func)
    CALLS[name](built)
    assert built.func.calls == 1


class _Marker:
    pass


class _Keep(torch.autograd.Function):
    """Identity whose graph node holds a marker object, to observe when the graph is freed."""

    markers: list = []

    @staticmethod
    def forward(ctx, x):
        ctx.marker = _Marker()
        _Keep.markers.append(weakref.ref(ctx.marker))
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g


@pytest.mark.parametrize("name", CLOSURE_FORMS)
def test_one_shot_functions_free_their_graph(name):
    built = build(case_by_id("mse-mean"))
    model, loss_fn, inputs, targets = built.model, built.loss_fn, built.inputs, built.targets
    _Keep.markers = []
    built.func = lambda: loss_fn(model(_Keep.apply(inputs)), targets)
    CALLS[name](built)
    gc.collect()
    assert len(_Keep.markers) == 1
    assert _Keep.markers[0]() is None, "the gradient graph outlived the call"


def test_marker_detects_a_live_graph():
    # the check above can fail: a graph kept alive keeps its marker
    x = torch.ones(2, dtype=F64, requires_grad=True)
    _Keep.markers = []
    graph = GradientGraph(lambda: (_Keep.apply(x) ** 3).sum(), [x], fname="test")
    gc.collect()
    assert _Keep.markers[0]() is not None
    graph.release()
    gc.collect()
    assert _Keep.markers[0]() is None


# ----------------------------------------------------------------------------- GradientGraph


def test_gradient_graph_attributes():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    b = torch.tensor([3.0], dtype=F64, requires_grad=True)
    unused = torch.ones(2, dtype=F64, requires_grad=True)
    with GradientGraph(lambda: (x**3).sum() + 2 * b.sum(), [x, b, unused], fname="t") as graph:
        assert graph.loss.item() == 1 + 8 + 6
        assert not graph.loss.requires_grad
        assert graph.grads[0] is not None
        assert graph.grads[1] is None  # constant gradient: linear
        assert graph.grads[2] is None  # no gradient: unused
        assert graph.saved_bytes > 0
        assert graph.engine == "vmap"
        (hx, hb, hu) = graph.vjp([torch.ones(2, dtype=F64), None, None], graph.params)
        assert_close(hx, 6 * x.detach())
        assert_close(hb, torch.zeros(1, dtype=F64))
        assert_close(hu, torch.zeros(2, dtype=F64))
    assert graph.grads == [None, None, None]


def test_vjp_where_nothing_is_differentiable_gives_zeros():
    # the cotangent only meets a constant gradient: zeros, with the stack's leading k
    x = torch.ones(2, 3, dtype=F64, requires_grad=True)
    b = torch.ones(4, dtype=F64, requires_grad=True)
    graph = GradientGraph(lambda: (x**3).sum() + b.sum(), [x, b], fname="t")
    hx, hb = graph.vjp([None, torch.ones(5, 4, dtype=F64)], [x, b], batched=True)
    assert_close(hx, torch.zeros(5, 2, 3, dtype=F64))
    assert_close(hb, torch.zeros(5, 4, dtype=F64))
    hx, hb = graph.vjp([None, torch.ones(4, dtype=F64)], [x, b])
    assert_close(hx, torch.zeros(2, 3, dtype=F64))


def test_strict_graph_names_the_parameter():
    x = torch.ones(2, dtype=F64, requires_grad=True)
    y = torch.ones(2, dtype=F64, requires_grad=True)
    with pytest.raises(
        ValueError, match=r"^f: the loss does not depend on params\[1\] \('layer\.y'\); "
    ):
        GradientGraph(lambda: (x**2).sum(), [x, y], fname="f", names=["x", "layer.y"], strict=True)


def test_loss_that_does_not_require_grad_has_zero_curvature_and_a_warning():
    # (detached or computed under no_grad: usually by mistake, so said)
    x = torch.ones(2, dtype=F64, requires_grad=True)
    warning = r"^t: the loss has no autograd graph, so every curvature is zero: it depends on none"
    with pytest.warns(RuntimeWarning, match=warning):
        graph = GradientGraph(lambda: (x**2).sum().detach(), [x], fname="t")
    assert graph.grads == [None]
    with pytest.warns(RuntimeWarning, match=r"^hvp: the loss has no autograd graph"):
        product = hvp(lambda: (x**2).sum().detach(), [x], x.detach())
    assert_close(product, torch.zeros(2, dtype=F64))
    with pytest.raises(ValueError, match=r"^hvp: the loss does not depend on params\[0\]"):
        hvp(lambda: (x**2).sum().detach(), [x], x.detach(), strict=True)


@pytest.mark.parametrize("chunk_size", [1, 4, None])
def test_dense_with_other_inputs_is_a_cross_block(chunk_size):
    built = build(case_by_id("mlp-tanh-ce"))
    rows, cols = built.params[2:], built.params[:2]
    graph = GradientGraph(built.func, rows, fname="t", extra=cols)
    block = graph.dense(cols, chunk_size=chunk_size)
    assert_close(block, ref.block(ref.case_hessian(built), built.params, [2, 3], [0, 1]))


def test_own_block_rows_yields_nothing_for_a_constant_gradient():
    x = torch.ones(2, dtype=F64, requires_grad=True)
    b = torch.ones(3, dtype=F64, requires_grad=True)
    graph = GradientGraph(lambda: (x**3).sum() + b.sum(), [x, b], fname="t")
    assert list(graph.own_block_rows(1)) == []
    rows = list(graph.own_block_rows(0, chunk_size=1))
    assert [start for start, _ in rows] == [0, 1]
    assert_close(torch.cat([r for _, r in rows]), torch.diag(6 * x.detach()))


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7])
def test_product_chunks_cover_all_products_in_order(chunk_size):
    x = torch.arange(1.0, 8.0, dtype=F64, requires_grad=True)
    graph = GradientGraph(lambda: (x**3).sum(), [x], fname="t")
    chunks = list(
        graph.product_chunks(
            7, lambda start, stop: unit_cotangents([x], start, stop), [x], chunk_size=chunk_size
        )
    )
    spans = [(start, stop) for start, stop, _ in chunks]
    assert spans == [(s, min(s + chunk_size, 7)) for s in range(0, 7, chunk_size)]
    H = torch.cat([products[0] for _, _, products in chunks])
    assert_close(H, torch.diag(6 * x.detach()))


def test_products_written_out_keep_the_last_chunk_until_the_next_or_release():
    x = torch.arange(1.0, 8.0, dtype=F64, requires_grad=True)
    graph = GradientGraph(lambda: (x**3).sum(), [x], fname="t")
    cotangents = [torch.eye(7, dtype=F64)]
    out = [torch.empty(7, 7, dtype=F64)]
    graph.products(cotangents, [x], chunk_size=3, out=out)
    assert_close(out[0], torch.diag(6 * x.detach()))
    kept = weakref.ref(graph._recent[0])  # the last chunk's own result (a row here)
    assert graph._recent[0].shape == (1, 7)
    graph.products(cotangents, [x], chunk_size=3, out=out)  # the next product lets it go
    assert kept() is None
    kept = weakref.ref(graph._recent[0])
    graph.release()
    assert kept() is None


# ----------------------------------------------------------------------------- unit cotangents


def test_unit_cotangents_span_parameter_boundaries():
    params = [torch.zeros(2, 2), torch.zeros(3), torch.zeros(1)]
    rows = unit_cotangents(params, 3, 6)  # flat rows 3, 4, 5: last of the first, two of the second
    assert rows[2] is None
    assert rows[0].shape == (3, 2, 2)
    assert rows[1].shape == (3, 3)
    flat = torch.cat([rows[0].reshape(3, -1), rows[1].reshape(3, -1), torch.zeros(3, 1)], dim=1)
    assert_close(flat, torch.eye(8)[3:6])


def test_unit_cotangents_follow_dtype_and_device():
    params = [torch.zeros(2, dtype=F64), torch.zeros(2, dtype=torch.float32)]
    rows = unit_cotangents(params, 0, 4)
    assert rows[0].dtype == F64
    assert rows[1].dtype == torch.float32


# ----------------------------------------------------------------------------- loop fallback


class _CubeGrad(torch.autograd.Function):
    """The derivative 3 x^2 g of x^3, whose own backward has no batching rule (``.item()``)."""

    @staticmethod
    def forward(ctx, x, g):
        ctx.save_for_backward(x, g)
        return 3 * x**2 * g

    @staticmethod
    def backward(ctx, gg):
        x, g = ctx.saved_tensors
        scale = 1.0 if gg.abs().sum().item() >= 0 else 0.0  # data-dependent: not vmappable
        return scale * 6 * x * g * gg, scale * 3 * x**2 * gg


class _Cube(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**3

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _CubeGrad.apply(x, g)


def test_operator_without_batching_rule_falls_back_to_a_loop():
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    y = torch.tensor([0.3, 0.7], dtype=F64, requires_grad=True)

    def func():
        return _Cube.apply(x).sum() + (x[:2] * y).sum() ** 2

    expected = ref.hessian(lambda x, y: (x**3).sum() + (x[:2] * y).sum() ** 2, [x, y])
    graph = GradientGraph(func, [x, y], fname="t")
    with pytest.raises(RuntimeError, match=r"vmap: .*calling .item\(\)"):
        graph.vjp(unit_cotangents([x, y], 0, 2), [x, y], batched=True)
    assert graph.engine == "vmap"
    assert_close(graph.dense([x, y], chunk_size=5), expected)
    assert graph.engine is None  # neither engine can batch .item(): a loop
    assert_close(hessian_matrix(func, [x, y], chunk_size=3), expected)
    assert_close(batched_hvp(func, [x, y], torch.eye(5, dtype=F64)), expected)
    assert_close(ref.flat(hessian_diagonal(func, [x, y], chunk_size=2)), torch.diagonal(expected))


def test_fallback_after_a_failing_batched_call(monkeypatch):
    built = build(case_by_id("gru"))
    vs = like(built.params, seed=1, k=6)
    expected = batched_hvp(built.func, built.params, vs, chunk_size=1)
    vjp = GradientGraph.vjp
    batched_calls = []

    def failing(self, cotangents, inputs, *, batched=False, create_graph=False):
        if batched:
            batched_calls.append(1)
            raise RuntimeError("Batching rule not implemented for aten::foo")
        return vjp(self, cotangents, inputs, batched=batched, create_graph=create_graph)

    monkeypatch.setattr(GradientGraph, "vjp", failing)
    result = batched_hvp(built.func, built.params, vs, chunk_size=4)
    assert batched_calls == [1, 1]  # each engine tried once, then the loop for the rest
    for r, e in zip(result, expected):
        assert_close(r, e)


def test_batched_and_loop_chunks_agree():
    built = build(case_by_id("attention"))
    graph = GradientGraph(built.func, built.params, fname="t")
    cotangents = like(built.params, seed=2, k=3)
    batched = graph._chunk(cotangents, built.params, 3, False)
    graph.engine = None
    loop = graph._chunk(cotangents, built.params, 3, False)
    for b, lo in zip(batched, loop):
        assert_close(b, lo)


# ----------------------------------------------------------------------------- memory cap


def test_memory_cap_is_at_least_one_and_shrinks_with_saved_bytes(monkeypatch):
    built = build(case_by_id("mlp-tanh-ce"))
    graph = GradientGraph(built.func, built.params, fname="t")
    cap = _chunks.memory_cap(graph, built.params)
    assert cap >= 1
    monkeypatch.setattr(_chunks, "CHUNK_MEMORY_BYTES", graph.saved_bytes * 8)
    assert 1 <= _chunks.memory_cap(graph, built.params) < 8  # saved bytes and vectors per product
    monkeypatch.setattr(_chunks, "CHUNK_MEMORY_BYTES", 1)
    assert _chunks.memory_cap(graph, built.params) == 1


def _every_saved_storage(roots):
    """Bytes of the storages in every ``_saved_`` field (and custom ``saved_tensors``)."""
    stack, seen, storages = [t.grad_fn for t in roots if t is not None], set(), {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for field in [f for f in dir(node) if f.startswith("_saved_") or f == "saved_tensors"]:
            try:
                value = getattr(node, field)
            except RuntimeError:
                continue
            for t in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(t, torch.Tensor):
                    storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        stack.extend(fn for fn, _ in node.next_functions)
    return sum(storages.values())


class _SavesTwo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return torch.sin(x * w)

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        return grad * torch.cos(x * w) * w, (grad * torch.cos(x * w) * x).sum(0)


@pytest.mark.parametrize("case", [c.id for c in CASES])
def test_saved_bytes_read_every_field_holding_tensors(case):
    built = build(case_by_id(case))
    graph = GradientGraph(built.func, built.params, fname="t")
    assert graph.saved_bytes == _every_saved_storage(graph.grads) > 0
    assert graph.convolves == case.startswith("cnn")


def test_saved_bytes_of_a_custom_function():
    x, w = torch.randn(5, 3), torch.randn(3, requires_grad=True)
    graph = GradientGraph(lambda: _SavesTwo.apply(x, w).pow(2).sum(), [w], fname="t")
    assert graph.saved_bytes == _every_saved_storage(graph.grads) >= x.numel() * 4


def test_a_cap_of_one_runs_single_products(monkeypatch):
    built = build(case_by_id("mse-mean"))
    monkeypatch.setattr(_chunks, "CHUNK_MEMORY_BYTES", 1)
    sizes = []
    chunk = GradientGraph._chunk

    def spy(self, cotangents, inputs, size, create_graph):
        sizes.append(size)
        return chunk(self, cotangents, inputs, size, create_graph)

    monkeypatch.setattr(GradientGraph, "_chunk", spy)
    H = hessian_matrix(built.func, built.params)
    assert sizes == [1] * 26
    assert_close(H, ref.case_hessian(built))


# ----------------------------------------------------------------------------- chunk rule


def _chunk_sizes(monkeypatch):
    sizes = []
    chunk = GradientGraph._chunk

    def spy(self, cotangents, inputs, size, create_graph):
        sizes.append(size)
        return chunk(self, cotangents, inputs, size, create_graph)

    monkeypatch.setattr(GradientGraph, "_chunk", spy)
    return sizes


def test_default_chunks_follow_the_device_rule(monkeypatch):
    built = build(case_by_id("gru"))  # 118 parameters, products of a few KiB
    graph = GradientGraph(built.func, built.params, fname="t")
    per_product = _chunks.product_bytes(graph, built.params)
    assert per_product * 118 < _chunks.CPU_CHUNK_BYTES
    sizes = _chunk_sizes(monkeypatch)
    H = hessian_matrix(built.func, built.params)
    assert sizes == [118]  # small products: one call
    assert_close(H, ref.case_hessian(built))
    for budget, default, expected in [
        (40, 32, [40, 40, 38]),  # grows past the default while the bytes allow
        (10, 32, [32, 32, 32, 22]),  # never below the default
        (10, 50, [50, 50, 18]),
    ]:
        sizes.clear()
        monkeypatch.setattr(_chunks, "CPU_CHUNK_BYTES", budget * per_product)
        monkeypatch.setitem(_chunks.DEFAULT_CHUNK_SIZE, "cpu", default)
        assert_close(hessian_matrix(built.func, built.params), H, rtol=1e-12, atol=1e-12)
        assert sizes == expected
    assert _chunks.device_default(torch.device("cuda"), 1) == _chunks.GPU_CHUNK_SIZE


def test_larger_products_run_in_smaller_chunks_on_the_cpu():
    cpu = torch.device("cpu")
    sizes = [2**10, 2**19, 2**19 + 1, 2**20, 2**20 + 1, 2**23, 2**23 + 1, 2**26]
    plain = [2**14, 32, 8, 8, 1, 1, 1, 1]
    assert [_chunks.device_default(cpu, size) for size in sizes] == plain
    convolutional = [2**14, 32, 32, 24, 23, 8, 1, 1]
    assert [_chunks.device_default(cpu, size, True) for size in sizes] == convolutional
    assert _chunks.device_default(torch.device("cuda"), 2**26) == _chunks.GPU_CHUNK_SIZE


@pytest.mark.parametrize(("name", "convolves"), [("mlp-tanh-ce", False), ("cnn-bn-train", True)])
def test_the_graph_says_whether_it_convolves(name, convolves):
    built = build(case_by_id(name))
    assert GradientGraph(built.func, built.params, fname="t").convolves is convolves


def test_memory_bounds_the_default_chunk(monkeypatch):
    built = build(case_by_id("gru"))
    graph = GradientGraph(built.func, built.params, fname="t")
    per_vector = graph.saved_bytes + 2 * sum(p.numel() * p.element_size() for p in built.params)
    monkeypatch.setattr(_chunks, "CHUNK_MEMORY_BYTES", 5 * per_vector)
    assert _chunks.chunk_size(graph, 100, built.params) == 5
    assert _chunks.chunk_size(graph, 3, built.params) == 3
    assert _chunks.chunk_size(graph, 1, built.params) == 1


@pytest.mark.parametrize("name", ["batched_hvp", "hessian_diagonal", "hessian_matrix"])
def test_the_same_call_gives_the_same_bits(case, name):
    first, second = tensors_of(CALLS[name](case)), tensors_of(CALLS[name](case))
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- engines


def test_vmap_engine_agrees_with_is_grads_batched(case, monkeypatch):
    vs = like(case.params, seed=3, k=5)
    expected = batched_hvp(case.func, case.params, vs)
    monkeypatch.setattr(_autograd, "ENGINES", ("is_grads_batched",))
    result = batched_hvp(case.func, case.params, vs)
    for r, e in zip(result, expected):
        assert_close(r, e)


def test_vmap_engine_falls_back_to_a_loop_without_a_batching_rule(monkeypatch):
    monkeypatch.setattr(_autograd, "ENGINES", ("vmap",))
    x = torch.tensor([1.0, -2.0, 0.5], dtype=F64, requires_grad=True)
    graph = GradientGraph(lambda: _Cube.apply(x).sum(), [x], fname="t")
    assert_close(graph.dense([x], chunk_size=3), torch.diag(6 * x.detach()))
    assert graph.engine is None


def test_vmap_engine_keeps_the_graph_for_third_derivatives(monkeypatch):
    monkeypatch.setattr(_autograd, "ENGINES", ("vmap",))
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    diagonal = hessian_diagonal(lambda: (x**3).sum(), [x], create_graph=True, chunk_size=2)
    (third,) = torch.autograd.grad(diagonal[0].sum(), x)
    assert_close(third, torch.full((2,), 6.0, dtype=F64))


@pytest.mark.parametrize(
    "message",
    [
        "one of the variables needed for gradient computation has been modified by an inplace "
        "operation",
        "CUDA out of memory. Tried to allocate 2.00 GiB",
    ],
)
def test_other_errors_of_a_batched_product_are_not_swallowed(monkeypatch, message):
    built = build(case_by_id("mlp-tanh-ce"))
    vjp = GradientGraph.vjp

    def failing(self, cotangents, inputs, *, batched=False, create_graph=False):
        if batched:
            raise RuntimeError(message)
        return vjp(self, cotangents, inputs, batched=batched, create_graph=create_graph)

    monkeypatch.setattr(GradientGraph, "vjp", failing)
    with pytest.raises(RuntimeError, match=message[:20]):
        batched_hvp(built.func, built.params, like(built.params, seed=1, k=4))


def test_a_batching_defect_of_one_engine_moves_on_to_the_next(monkeypatch):
    # the legacy vmap behind is_grads_batched gets the shapes of GroupNorm's double backward
    # wrong (a size mismatch); torch.func.vmap batches it correctly
    monkeypatch.setattr(_autograd, "ENGINES", ("is_grads_batched", "vmap"))
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.GroupNorm(2, 4))
    model = model.to(F64)
    x = torch.randn(5, 3, 4, 4, dtype=F64)
    params = list(model.parameters())
    graph = GradientGraph(lambda: (model(x) ** 3).sum(), params, fname="t")
    rows = graph.dense(params, chunk_size=8)
    assert graph.engine == "vmap"
    assert_close(rows, ref.hessian(lambda *p: _functional(model, p, x), params))


def _functional(model, tensors, x):
    names = [name for name, _ in model.named_parameters()]
    out = torch.func.functional_call(model, dict(zip(names, tensors)), (x,))
    return (out**3).sum()


class _OnceTanh(torch.autograd.Function):
    """tanh whose backward cannot be differentiated again (``@once_differentiable``)."""

    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return grad * (1 - a.tanh() ** 2)


class _Cut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last = torch.nn.Linear(3, 4), torch.nn.Linear(4, 2)

    def forward(self, x):
        return self.last(_OnceTanh.apply(self.first(x)))


def _cut_case():
    torch.manual_seed(0)
    model = _Cut().to(torch.float64)
    inputs, targets = torch.randn(5, 3, dtype=torch.float64), torch.randint(0, 2, (5,))
    loss_fn = torch.nn.CrossEntropyLoss()
    params = list(model.parameters())
    func = lambda: loss_fn(model(inputs), targets)  # noqa: E731
    return type(
        "Cut",
        (),
        dict(
            model=model, loss_fn=loss_fn, inputs=inputs, targets=targets, params=params, func=func
        ),
    )


class _FusedMSE(torch.autograd.Function):
    """A mean squared error with a hand-written backward marked ``@once_differentiable``."""

    @staticmethod
    def forward(ctx, out, target):
        ctx.save_for_backward(out, target)
        return ((out - target) ** 2).mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        out, target = ctx.saved_tensors
        return grad * 2 * (out - target) / out.numel(), None


def _fused_loss_case():
    built = _cut_case()
    built.model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh()).double()
    built.targets = torch.randn(5, 4, dtype=torch.float64)
    built.loss_fn = _FusedMSE.apply
    built.params = list(built.model.parameters())
    built.func = lambda: _FusedMSE.apply(built.model(built.inputs), built.targets)
    return built


@pytest.mark.parametrize("case", [_cut_case, _fused_loss_case], ids=["cut", "fused-loss"])
@pytest.mark.parametrize("name", list(CALLS))
def test_every_function_reports_a_cut_second_derivative(name, case):
    # cut: the gradient of 'first' passes through a backward marked @once_differentiable, its
    # curvature would read as zero; fused-loss: such a Function computes the loss, its backward
    # runs on a constant cotangent, no error node marks the cut, the gradients have no graph at
    # all and every curvature read as zero without a word. Every function says so.
    with pytest.warns(RuntimeWarning, match=r"params\[0\].*once_differentiable"):
        CALLS[name](case())


class _Linear(torch.autograd.Function):
    """3 x, its backward marked ``@once_differentiable`` (its own second derivative is zero)."""

    @staticmethod
    def forward(ctx, x):
        return 3 * x

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        return 3 * grad


def test_a_once_differentiable_function_behind_the_loss_warns_also_with_strict():
    # the Function's own second derivative is missing: zero only where it is linear, as here
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match=r"params\[0\] .* own second derivative is missing"):
        result = hvp(lambda: _Linear.apply(w**2).sum(), [w], [torch.ones_like(w)], strict=True)
    assert_close(result[0], torch.full_like(w, 6.0))


class _SquareByVjp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def vjp(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


class _SquareUnderAmp(torch.autograd.Function):
    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x**2

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return 2 * x * grad


@pytest.mark.parametrize("function", [_SquareByVjp, _SquareUnderAmp], ids=["vjp", "custom_bwd"])
def test_a_once_differentiable_backward_is_found_however_written(function):
    w = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64, requires_grad=True)
    with pytest.warns(RuntimeWarning, match="once_differentiable"):
        hessian_diagonal(lambda: function.apply(w).sum(), [w])


def test_strict_refuses_a_cut_second_derivative():
    built = _cut_case()
    with pytest.raises(ValueError, match=r"params\[0\].*cannot be differentiated"):
        hvp(built.func, built.params, like(built.params, seed=0), strict=True)


def test_a_whole_gradient_raises_no_warning():
    built = _cut_case()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        hessian_diagonal(built.func, built.params[2:])  # 'last' is before the cut


def test_output_hessians_and_analyses_report_a_cut_second_derivative():
    built = _cut_case()
    with pytest.warns(RuntimeWarning, match="once_differentiable"):
        output_hessian_matrix(built.model, built.inputs)
    with (
        pytest.warns(RuntimeWarning, match="once_differentiable"),
        pytest.raises(ValueError, match="not symmetric"),  # the cut made it so
    ):
        model_top_eigenvalues(built.model, built.loss_fn, (built.inputs, built.targets))
