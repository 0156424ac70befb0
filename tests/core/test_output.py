"""Output Hessians and named block dictionaries against torch.func ground truth in float64.

The oracle (:func:`tests.reference.case_output_hessians`) differentiates the model's flat
output twice with ``jacrev(jacrev(...))`` over ``torch.func.functional_call``, its forward pass
under RNG seed 0: the masks the library's model forms draw.
"""

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import CASES, Built, build, case_by_id
from tests.core.helpers import assert_unchanged, cdist_model, snapshot
from torch_secorder import (
    model_hessian_dict,
    model_hessian_matrix,
    output_hessian_dict,
    output_hessian_matrix,
)

F64 = torch.float64


def built_of(model: nn.Module, inputs: Tensor) -> Built:
    """A model and its inputs in the shape of a built zoo case (for the oracle)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    names, params = [n for n, _ in named], [p for _, p in named]
    return Built(None, model, None, inputs, None, names, params, None)  # type: ignore[arg-type]


def blocks_of(H: Tensor, params: list[Tensor], names: list[str]) -> dict[str, dict[str, Tensor]]:
    """Cut ``(..., P, P)`` matrices into named blocks ``(..., *P.shape, *Q.shape)``."""
    lead = H.shape[:-2]
    offsets = [0]
    for p in params:
        offsets.append(offsets[-1] + p.numel())
    return {
        a: {
            b: H[..., offsets[i] : offsets[i + 1], offsets[j] : offsets[j + 1]].reshape(
                *lead, *p.shape, *q.shape
            )
            for j, (b, q) in enumerate(zip(names, params))
        }
        for i, (a, p) in enumerate(zip(names, params))
    }


def diagonal_only(H: Tensor, params: list[Tensor]) -> Tensor:
    """``H`` with every entry outside the per-parameter diagonal blocks set to zero."""
    mask = torch.block_diag(*[torch.ones(p.numel(), p.numel(), dtype=torch.bool) for p in params])
    return H * mask


class Counted(nn.Module):
    """A two-layer tanh network counting its forward passes and the backward passes through it."""

    def __init__(self, sizes=(3, 4, 2)):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh())
        self.head = nn.Linear(sizes[1], sizes[2])
        self.forwards = 0
        self.backwards = 0

    def forward(self, x):
        self.forwards += 1
        module = self

        class Tap(torch.autograd.Function):
            @staticmethod
            def forward(ctx, t):
                return t.view_as(t)

            @staticmethod
            def backward(ctx, grad):
                module.backwards += 1
                return grad

        return self.head(Tap.apply(self.body(x)))


# ----------------------------------------------------------------------------- ground truth


def test_oracle_on_a_closed_form():
    # y_k = w2 (W1 x_k) for W1 (2, 3) and w2 (1, 2): d2 y_k / dW1[i, j] dw2[i] = x_k[j], else 0
    model = nn.Sequential(nn.Linear(3, 2, bias=False), nn.Linear(2, 1, bias=False)).to(F64)
    x = torch.tensor([[1.0, 2.0, 3.0], [-1.0, 0.5, 4.0]], dtype=F64)
    H, shape = ref.case_output_hessians(built_of(model, x))
    assert shape == (2, 1)
    expected = torch.zeros(2, 8, 8, dtype=F64)
    for k in range(2):
        for i in range(2):
            for j in range(3):
                expected[k, 3 * i + j, 6 + i] = expected[k, 6 + i, 3 * i + j] = x[k, j]
    assert_close(H, expected)
    assert_close(output_hessian_matrix(model, x).reshape(2, 8, 8), expected)


def test_matrix_matches_oracle(case):
    result = output_hessian_matrix(case.model, case.inputs)
    H, shape = ref.case_output_hessians(case)
    P = sum(p.numel() for p in case.params)
    assert result.shape == (*shape, P, P)
    assert result.dtype == F64
    assert_close(result.reshape(-1, P, P), H)


@pytest.mark.parametrize(
    "case_id", ["mlp-tanh-ce", "cnn-bn-train", "multi-input", "scalar-param", "gru"]
)
def test_dict_matches_oracle_blocks(case_id):
    built = build(case_by_id(case_id))
    result = output_hessian_dict(built.model, built.inputs)
    H, shape = ref.case_output_hessians(built)
    expected = blocks_of(H.reshape(*shape, *H.shape[-2:]), built.params, built.names)
    assert list(result) == built.names
    for a, p in zip(built.names, built.params):
        assert list(result[a]) == built.names
        for b, q in zip(built.names, built.params):
            assert result[a][b].shape == (*shape, *p.shape, *q.shape)
            assert_close(result[a][b], expected[a][b])


def test_dict_and_matrix_hold_the_same_numbers(case):
    matrix = output_hessian_matrix(case.model, case.inputs)
    blocks = output_hessian_dict(case.model, case.inputs)
    expected = blocks_of(matrix, case.params, case.names)
    for a in case.names:
        for b in case.names:
            assert torch.equal(blocks[a][b], expected[a][b])


def test_entry_is_the_hessian_of_one_output_element_of_one_sample():
    # the loss form, differentiating out[k, o], gives entry [k, o]: one model, one Hessian
    built = build(case_by_id("mlp-tanh-ce"))
    H = output_hessian_matrix(built.model, built.inputs)
    for k, o in [(0, 0), (3, 2), (5, 1)]:
        expected = model_hessian_matrix(
            built.model, lambda out, _, k=k, o=o: out[k, o], built.inputs, None
        )
        assert_close(H[k, o], expected)


@pytest.mark.parametrize("case_id", ["mlp-tanh-ce", "transformer", "tied-embedding"])
def test_diagonal_only_keeps_the_diagonal_blocks(case_id):
    built = build(case_by_id(case_id))
    full = output_hessian_matrix(built.model, built.inputs)
    P = full.shape[-1]
    result = output_hessian_matrix(built.model, built.inputs, diagonal_only=True)
    expected = diagonal_only(full.reshape(-1, P, P), built.params).reshape(full.shape)
    assert_close(result, expected)
    blocks = output_hessian_dict(built.model, built.inputs, diagonal_only=True)
    full_blocks = blocks_of(full, built.params, built.names)
    for a in built.names:
        assert list(blocks[a]) == [a]
        assert_close(blocks[a][a], full_blocks[a][a])


def test_weights_and_biases_of_different_dimensions():
    # hesse fails whenever the selected parameters differ in their number of dimensions
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    built = built_of(model, x)
    H, shape = ref.case_output_hessians(built)
    result = output_hessian_dict(model, x, params=["0.weight", "0.bias"])
    assert result["0.weight"]["0.bias"].shape == (5, 2, 4, 3, 4)
    assert result["0.bias"]["0.weight"].shape == (5, 2, 4, 4, 3)
    expected = blocks_of(H.reshape(5, 2, 26, 26)[..., :16, :16], built.params[:2], built.names[:2])
    for a in ["0.weight", "0.bias"]:
        for b in ["0.weight", "0.bias"]:
            assert_close(result[a][b], expected[a][b])


def test_outputs_with_several_non_batch_dimensions():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 2), nn.Tanh(), nn.Conv2d(2, 2, 2)).to(F64)  # (b, 2, 2, 2)
    x = torch.randn(3, 1, 4, 4, dtype=F64)
    built = built_of(model, x)
    result = output_hessian_matrix(model, x)
    H, shape = ref.case_output_hessians(built)
    assert shape == (3, 2, 2, 2)
    assert result.shape == (3, 2, 2, 2, 28, 28)
    assert_close(result.reshape(-1, 28, 28), H)


def test_multi_input_as_tuple_and_as_keywords():
    built = build(case_by_id("multi-input"))
    x1, x2 = built.inputs
    by_position = output_hessian_matrix(built.model, (x1, x2))
    by_keyword = output_hessian_matrix(built.model, {"x1": x1, "x2": x2})
    assert torch.equal(by_position, by_keyword)
    H, _ = ref.case_output_hessians(built)
    assert_close(by_position.reshape(H.shape), H)


def test_one_sample_without_batch_dimension():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    batch = output_hessian_matrix(model, x)
    one = output_hessian_matrix(model, x[2], batched=False)
    assert one.shape == (2, 26, 26)
    assert_close(one, batch[2])
    blocks = output_hessian_dict(model, x[2], batched=False)
    assert blocks["2.weight"]["0.bias"].shape == (2, 2, 4, 4)


def test_scalar_outputs_drop_their_dimensions():
    torch.manual_seed(0)
    body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1), nn.Flatten(0)).to(F64)
    x = torch.randn(5, 3, dtype=F64)
    per_sample = output_hessian_matrix(body, x)  # output (5,): one scalar per sample
    assert per_sample.shape == (5, 21, 21)
    scalar = output_hessian_matrix(body, x[:1], batched=False)  # output (1,)
    assert_close(scalar[0], per_sample[0])

    class Total(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = body

        def forward(self, x):
            return self.body(x).sum()

    total = output_hessian_matrix(Total(), x, batched=False)  # a 0-d output: (P, P)
    assert total.shape == (21, 21)
    assert_close(total, per_sample.sum(0))


def test_selection_and_frozen_parameters():
    built = build(case_by_id("frozen"))  # 0.bias is frozen
    default = output_hessian_dict(built.model, built.inputs)
    assert list(default) == ["0.weight", "2.weight", "2.bias"]
    named = output_hessian_matrix(built.model, built.inputs, params=["0.*"])
    H, _ = ref.case_output_hessians(built, ["0.weight", "0.bias"])
    assert_close(named.reshape(H.shape), H)
    frozen = built.model.get_parameter("0.bias")
    assert not frozen.requires_grad
    assert frozen.grad is None


def test_unused_parameter_gives_zeros():
    built = build(case_by_id("unused"))
    result = output_hessian_matrix(built.model, built.inputs, params="unused.*")
    assert result.shape == (5, 2, 5, 5)
    assert torch.count_nonzero(result) == 0


# ----------------------------------------------------------------------------- modes and state


def test_train_mode_dropout_draws_the_fixed_masks():
    built = build(case_by_id("dropout"))
    result = output_hessian_matrix(built.model, built.inputs)
    H, _ = ref.case_output_hessians(built)  # forward under seed 0
    assert_close(result.reshape(H.shape), H)
    # the loss form draws the same masks: one model, one Hessian
    entry = model_hessian_matrix(built.model, lambda out, _: out[4, 1], built.inputs, None)
    assert_close(result[4, 1], entry)
    built.model.eval()
    assert not torch.allclose(output_hessian_matrix(built.model, built.inputs), result)


@pytest.mark.parametrize("name", ["matrix", "dict"])
@pytest.mark.parametrize("case_id", ["cnn-bn-train", "cnn-bn-eval", "dropout", "frozen"])
def test_no_side_effects(name, case_id):
    built = build(case_by_id(case_id))
    for p in built.params[:1]:
        p.grad = torch.full_like(p, 7.0)
    before = snapshot(built.model)
    call = output_hessian_matrix if name == "matrix" else output_hessian_dict
    call(built.model, built.inputs)
    assert_unchanged(before, built.model)


def test_mode_is_used_as_found_and_left_alone():
    built = build(case_by_id("cnn-bn-train"))
    train = output_hessian_matrix(built.model, built.inputs)
    assert built.model.training
    H, _ = ref.case_output_hessians(built)
    assert_close(train.reshape(H.shape), H)
    built.model.eval()
    evaluated = output_hessian_matrix(built.model, built.inputs)
    assert not built.model.training
    H, _ = ref.case_output_hessians(built)
    assert_close(evaluated.reshape(H.shape), H)
    assert not torch.allclose(train, evaluated)  # batch statistics vs running statistics


def test_no_side_effects_when_raising_after_the_forward_pass():
    built = build(case_by_id("cnn-bn-train"))
    before = snapshot(built.model)
    with pytest.raises(ValueError, match=r"^output_hessian_matrix: the result of shape"):
        output_hessian_matrix(built.model, built.inputs, max_bytes=1e5)
    assert_unchanged(before, built.model)


def test_under_no_grad_and_reproducible():
    built = build(case_by_id("cnn-bn-train"))
    first = output_hessian_matrix(built.model, built.inputs)
    with torch.no_grad():
        second = output_hessian_matrix(built.model, built.inputs)
    assert torch.equal(first, second)
    blocks = output_hessian_dict(built.model, built.inputs, diagonal_only=True)
    again = output_hessian_dict(built.model, built.inputs, diagonal_only=True)
    for a in blocks:
        assert torch.equal(blocks[a][a], again[a][a])


@pytest.mark.parametrize("chunk_size", [1, 3, 1000])
def test_chunk_sizes(chunk_size):
    built = build(case_by_id("attention"))
    result = output_hessian_matrix(built.model, built.inputs, chunk_size=chunk_size)
    H, _ = ref.case_output_hessians(built)
    assert_close(result.reshape(H.shape), H)


def test_float32_keeps_dtype():
    built = build(case_by_id("mlp-tanh-ce"), dtype=torch.float32)
    default = torch.get_default_dtype()
    result = output_hessian_matrix(built.model, built.inputs)
    blocks = output_hessian_dict(built.model, built.inputs)
    assert result.dtype == torch.float32
    assert blocks["0.weight"]["2.bias"].dtype == torch.float32
    assert torch.get_default_dtype() == default
    reference = output_hessian_matrix(build(case_by_id("mlp-tanh-ce")).model, built.inputs.double())
    assert_close(result, reference.float())


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_results_stay_on_the_device():
    gpu = build(case_by_id("cnn-bn-train"), device="cuda")
    cpu = build(case_by_id("cnn-bn-train"))
    result = output_hessian_matrix(gpu.model, gpu.inputs)
    blocks = output_hessian_dict(gpu.model, gpu.inputs, diagonal_only=True)
    assert result.device.type == "cuda"
    assert blocks["0.weight"]["0.weight"].device.type == "cuda"
    assert_close(result.cpu(), output_hessian_matrix(cpu.model, cpu.inputs))


# ----------------------------------------------------------------------------- model_hessian_dict


@pytest.mark.parametrize("case_id", [case.id for case in CASES[:10]])
def test_loss_dict_matches_reference(case_id):
    built = build(case_by_id(case_id))
    result = model_hessian_dict(built.model, built.loss_fn, built.inputs, built.targets)
    expected = blocks_of(ref.case_hessian(built), built.params, built.names)
    assert list(result) == built.names
    for a, p in zip(built.names, built.params):
        assert list(result[a]) == built.names
        for b, q in zip(built.names, built.params):
            assert result[a][b].shape == (*p.shape, *q.shape)
            assert_close(result[a][b], expected[a][b])


@pytest.mark.parametrize("case_id", ["dropout", "cnn-bn-train", "shared-twice"])
def test_loss_dict_diagonal_only_and_matrix(case_id):
    built = build(case_by_id(case_id))
    matrix = model_hessian_matrix(built.model, built.loss_fn, built.inputs, built.targets)
    full = blocks_of(matrix, built.params, built.names)
    blocks = model_hessian_dict(
        built.model, built.loss_fn, built.inputs, built.targets, diagonal_only=True
    )
    for a in built.names:
        assert list(blocks[a]) == [a]
        assert_close(blocks[a][a], full[a][a])


def test_loss_dict_selection_and_side_effects():
    built = build(case_by_id("frozen"))
    before = snapshot(built.model)
    result = model_hessian_dict(
        built.model, built.loss_fn, built.inputs, built.targets, params=["0.bias", "2.weight"]
    )
    assert_unchanged(before, built.model)
    expected = blocks_of(ref.case_hessian(built, ["0.bias", "2.weight"]), *_named(built))
    for a in ["0.bias", "2.weight"]:
        for b in ["0.bias", "2.weight"]:
            assert_close(result[a][b], expected[a][b])


def _named(built):
    names = ["0.bias", "2.weight"]
    return built.select(names), names


# ----------------------------------------------------------------------------- errors


def test_size_is_refused_before_the_forward_pass():
    model = nn.Linear(1000, 1000)  # 1 001 000 float32 parameters
    P = 1000 * 1000 + 1000
    calls = []
    model.register_forward_pre_hook(lambda *_: calls.append(1))
    need = f"{P * P * 4 / 2**40:.1f} TiB"
    with pytest.raises(
        ValueError,
        match=rf"^output_hessian_matrix: the {P} x {P} Hessian of one output element \(float32\) "
        rf"needs {need}, more than max_bytes=8\.0 GiB; use output_sharpness, diagonal_only=True "
        r"with output_hessian_dict, or a smaller selection with params=\.$",
    ):
        output_hessian_matrix(model, torch.ones(1, 1000))
    with pytest.raises(
        ValueError,
        match=rf"^output_hessian_dict: the blocks of one output element's Hessian \({P * P} "
        rf"entries\) \(float32\) needs {need}, ",
    ):
        output_hessian_dict(model, torch.ones(1, 1000))
    assert calls == []


def test_size_is_refused_after_the_forward_pass_before_any_derivative():
    model = Counted().to(F64)  # P = 26
    x = torch.ones(5, 3, dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"^output_hessian_matrix: the result of shape \(5, 2, 26, 26\) \(float64\) needs "
        r"52\.8 KiB, more than max_bytes=50\.0 KiB; use output_sharpness, ",
    ):
        output_hessian_matrix(model, x, max_bytes=50 * 1024)
    with pytest.raises(
        ValueError,
        match=r"^output_hessian_dict: the blocks of 10 output elements' Hessians \(2280 entries\) "
        r"\(float64\) needs 17\.8 KiB, more than max_bytes=10\.0 KiB; ",
    ):
        output_hessian_dict(model, x, diagonal_only=True, max_bytes=10 * 1024)
    assert model.forwards == 2
    assert model.backwards == 0
    output_hessian_matrix(model, x, max_bytes=5 * 2 * 26 * 26 * 8)  # the limit is sharp
    assert model.backwards > 0


def test_loss_dict_size_is_refused_before_any_work():
    model = Counted().to(F64)
    loss_fn_calls = []

    def loss_fn(out, target):
        loss_fn_calls.append(1)
        return out.sum()

    x = torch.ones(5, 3, dtype=F64)
    with pytest.raises(
        ValueError,
        match=r"^model_hessian_dict: the blocks of the Hessian \(676 entries\) \(float64\) needs "
        r"5\.3 KiB, more than max_bytes=1000 B; use diagonal_only=True, HessianOperator, or a "
        r"smaller selection with params=\.$",
    ):
        model_hessian_dict(model, loss_fn, x, None, max_bytes=1000)
    with pytest.raises(  # (the hint leaves out what was asked already)
        ValueError, match=r"more than max_bytes=200 B; use HessianOperator, or a smaller selection"
    ):
        model_hessian_dict(model, loss_fn, x, None, max_bytes=200, diagonal_only=True)
    with pytest.raises(
        ValueError, match=r"more than max_bytes=200 B; use output_sharpness, or a smaller selection"
    ):
        output_hessian_dict(model, x, max_bytes=200, diagonal_only=True)
    assert model.forwards == 0
    assert loss_fn_calls == []


@pytest.mark.parametrize("fname", ["output_hessian_matrix", "output_hessian_dict"])
def test_argument_errors_before_the_forward_pass(fname):
    call = {
        "output_hessian_matrix": output_hessian_matrix,
        "output_hessian_dict": output_hessian_dict,
    }[fname]
    model = Counted().to(F64)
    x = torch.ones(4, 3, dtype=F64)
    cases = [
        ((3, x), {}, TypeError, r"model must be a torch\.nn\.Module; got int\.$"),
        (
            (model, 3),
            {},
            TypeError,
            r"inputs must be a Tensor, a tuple of model arguments or a dict of keyword "
            r"arguments; got int\.$",
        ),
        (
            (model, x),
            {"params": "nope"},
            ValueError,
            r"params entry 'nope' matches no parameter of the model; its parameters are: "
            r"body\.0\.weight, body\.0\.bias, head\.weight, head\.bias\.$",
        ),
        ((model, x), {"batched": 1}, TypeError, r"batched must be a bool; got int\.$"),
        ((model, x), {"diagonal_only": None}, TypeError, r"diagonal_only must be a bool; got "),
        ((model, x), {"max_bytes": 0}, ValueError, r"max_bytes must be positive; got 0\.$"),
        ((model, x), {"max_bytes": "1G"}, TypeError, r"max_bytes must be a number; got str\.$"),
        ((model, x), {"chunk_size": 0}, ValueError, r"chunk_size must be a positive int; got 0\.$"),
    ]
    for args, kwargs, error, message in cases:
        with pytest.raises(error, match=f"^{fname}: {message}"):
            call(*args, **kwargs)
    model.head.bias.data = model.head.bias.data.float()
    with pytest.raises(
        ValueError,
        match=rf"^{fname}: the output Hessians needs params of one dtype and device, but "
        r"params\[0\] \('body\.0\.weight'\) is torch\.float64 on cpu and params\[3\] "
        r"\('head\.bias'\) is torch\.float32 on cpu; cast them to one dtype and device\.$",
    ):
        call(model, x)
    assert model.forwards == 0


def test_output_errors_after_the_forward_pass():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 2).to(F64)

        def forward(self, x):
            return self.lin(x), x

    class Labels(Pair):
        def forward(self, x):
            return self.lin(x).argmax(-1)

    class Total(Pair):
        def forward(self, x):
            return self.lin(x).sum()

    x = torch.ones(4, 3, dtype=F64)
    with pytest.raises(
        TypeError,
        match=r"^output_hessian_matrix: model must return a Tensor; got tuple\. Wrap the model in "
        r"a module that returns the one output tensor to differentiate\.$",
    ):
        output_hessian_matrix(Pair(), x)
    with pytest.raises(
        ValueError,
        match=r"^output_hessian_dict: model returned a torch\.int64 output; expected a "
        r"floating-point tensor\.$",
    ):
        output_hessian_dict(Labels(), x)
    # a scalar output has no dimensions to keep, batched or not: (P, P)
    assert torch.equal(
        output_hessian_matrix(Total(), x), output_hessian_matrix(Total(), x, batched=False)
    )


def test_loss_dict_errors():
    model = Counted().to(F64)
    x = torch.ones(4, 3, dtype=F64)
    with pytest.raises(
        TypeError, match=r"^model_hessian_dict: loss_fn must be callable; got int\.$"
    ):
        model_hessian_dict(model, 3, x, None)
    with pytest.raises(
        TypeError, match=r"^model_hessian_dict: diagonal_only must be a bool; got str\.$"
    ):
        model_hessian_dict(model, lambda out, _: out.sum(), x, None, diagonal_only="yes")
    with pytest.raises(
        ValueError,
        match=r"^model_hessian_dict: loss_fn must return a scalar loss; got a tensor of shape "
        r"\(4, 2\)\. Reduce it, e\.g\. with \.mean\(\) or \.sum\(\)\.$",
    ):
        model_hessian_dict(model, lambda out, _: out, x, None)
    assert model.backwards == 0


def test_an_operator_without_second_derivative_is_named_with_its_module():
    model = cdist_model()
    x = torch.randn(4, 3, dtype=F64)
    before = snapshot(model)
    with pytest.raises(
        RuntimeError,
        match=r"^output_hessian_matrix: PyTorch cannot differentiate the operator 'cdist' twice "
        r".*, called in module '2' \(_Distances\)",
    ):
        output_hessian_matrix(model, x)
    assert_unchanged(before, model)


class _Scaled(nn.Module):
    """A linear layer times a 0-d parameter (summed: a scalar output)."""

    def __init__(self, summed=False):
        super().__init__()
        self.lin = nn.Linear(3, 2)
        self.scale = nn.Parameter(torch.tensor(1.3))
        self.summed = summed

    def forward(self, x):
        y = self.scale * torch.tanh(self.lin(x))
        return y.sum() if self.summed else y


def test_blocks_of_a_zero_dimensional_parameter():
    # (*P.shape, *Q.shape) of a 0-d parameter: its view took no shape and raised
    torch.manual_seed(0)
    model, x = _Scaled().to(F64), torch.randn(4, 3, dtype=F64)
    y = torch.randn(4, 2, dtype=F64)
    H = model_hessian_dict(model, nn.MSELoss(), x, y)
    assert H["scale"]["scale"].shape == ()
    assert H["scale"]["lin.weight"].shape == (2, 3)
    # (the model's own parameter first, as named_parameters lists it)
    assert_close(H["scale"]["scale"], model_hessian_matrix(model, nn.MSELoss(), x, y)[0, 0])
    model.summed = True
    scalar = output_hessian_dict(model, x)
    assert scalar["scale"]["scale"].shape == ()
    assert_close(scalar["scale"]["scale"], output_hessian_matrix(model, x)[0, 0])


class _Relu6Gate(nn.Module):
    def forward(self, x):
        return torch.nn.functional.relu6(x + 3) / 6  # hardsigmoid, differentiable twice


def test_hardsigmoid_is_differentiated_twice():
    # hardsigmoid's backward has no derivative; the engine routes it to relu6(x + 3) / 6
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Hardsigmoid(), nn.Linear(4, 2)).to(F64)
    x = 2 * torch.randn(5, 3, dtype=F64)
    result = output_hessian_matrix(model, x)
    twin = nn.Sequential(model[0], _Relu6Gate(), model[2])  # the same parameters
    H, _ = ref.case_output_hessians(built_of(twin, x))
    assert torch.count_nonzero(H) > 0
    assert_close(result.reshape(H.shape), H)
