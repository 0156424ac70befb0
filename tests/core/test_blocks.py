"""hessian_block and hessian_blocks against the dense reference."""

import pytest
import torch
from torch.testing import assert_close

from tests import reference as ref
from tests.cases import build, case_by_id
from torch_secorder import hessian_block, hessian_blocks
from torch_secorder.core import _autograd, blocks


def _split(case):
    """Index selections: the first parameter vs the rest, and an overlapping pair."""
    n = len(case.params)
    return list(range(1)), list(range(1, n)) if n > 1 else [0]


def _block(case, rows, cols):
    result = hessian_block(
        case.func, [case.params[i] for i in rows], [case.params[j] for j in cols]
    )
    expected = ref.block(ref.case_hessian(case), case.params, rows, cols)
    assert result.shape == expected.shape
    assert result.dtype == case.params[0].dtype
    assert_close(result, expected)


def test_block_disjoint(case):
    rows, cols = _split(case)
    _block(case, rows, cols)


def test_block_disjoint_transposed(case):
    # more rows than columns: the library differentiates the other way round
    rows, cols = _split(case)
    _block(case, cols, rows)


def test_block_overlapping(case):
    n = len(case.params)
    _block(case, list(range(n)), list(range(n // 2, n)))


def test_block_own(case):
    rows = list(range(len(case.params)))[-2:]
    result = hessian_block(case.func, [case.params[i] for i in rows])
    assert_close(result, ref.block(ref.case_hessian(case), case.params, rows, rows))


def test_block_in_any_order():
    built = build(case_by_id("gru"))
    rows, cols = [4, 0], [2, 3, 1]
    _block(built, rows, cols)


def test_block_as_generators():
    built = build(case_by_id("mlp-tanh-ce"))
    result = hessian_block(built.func, (p for p in built.params[:2]), iter(built.params[2:]))
    expected = ref.block(ref.case_hessian(built), built.params, [0, 1], [2, 3])
    assert_close(result, expected)


class _SpyGraph(_autograd.GradientGraph):
    built_with: list[list[torch.Tensor]] = []

    def __init__(self, func, params, **kwargs):
        type(self).built_with.append(params)
        super().__init__(func, params, **kwargs)


@pytest.mark.parametrize(("num_rows", "transposed"), [(1, False), (3, True)])
def test_block_differentiates_the_smaller_side(monkeypatch, num_rows, transposed):
    # min(P_R, P_C) products: the gradient is taken of the smaller selection.
    built = build(case_by_id("mlp-tanh-ce"))  # parameters of 20, 5, 15 and 3 entries
    rows, cols = built.params[:num_rows], built.params[num_rows:]
    _SpyGraph.built_with = []
    monkeypatch.setattr(blocks, "GradientGraph", _SpyGraph)
    result = hessian_block(built.func, rows, cols)
    assert _SpyGraph.built_with == [cols if transposed else rows]
    expected = ref.block(
        ref.case_hessian(built),
        built.params,
        list(range(num_rows)),
        list(range(num_rows, 4)),
    )
    assert_close(result, expected)


@pytest.mark.parametrize("chunk_size", [1, 2, 5, None])
@pytest.mark.parametrize("case_id", ["cnn-bn-train", "attention", "unused"])
def test_block_chunk_sizes(case_id, chunk_size):
    built = build(case_by_id(case_id))
    n = len(built.params)
    rows, cols = list(range(n - 2)), [n - 2, n - 1]
    for r, c in [(rows, cols), (cols, rows)]:
        result = hessian_block(
            built.func,
            [built.params[i] for i in r],
            [built.params[j] for j in c],
            chunk_size=chunk_size,
        )
        assert_close(result, ref.block(ref.case_hessian(built), built.params, r, c))


def test_block_of_unused_parameter_is_zero():
    built = build(case_by_id("unused"))
    unused = [built.names.index("unused.weight"), built.names.index("unused.bias")]
    others = [i for i in range(len(built.params)) if i not in unused]
    pick = built.params.__getitem__
    assert torch.count_nonzero(hessian_block(built.func, [pick(i) for i in unused])) == 0
    block = hessian_block(built.func, [pick(i) for i in unused], [pick(i) for i in others])
    assert block.shape == (5, 26)
    assert torch.count_nonzero(block) == 0


def test_block_with_a_frozen_parameter():
    built = build(case_by_id("frozen"))
    frozen = built.model.get_parameter("0.bias")
    weight = built.model.get_parameter("0.weight")
    result = hessian_block(built.func, [frozen], [weight])
    H = ref.case_hessian(built, ["0.weight", "0.bias"])
    assert_close(result, H[12:, :12])
    assert not frozen.requires_grad
    assert frozen.grad is None


# ----------------------------------------------------------------------------- hessian_blocks


def test_blocks_match_reference(case):
    result = hessian_blocks(case.func, case.params)
    expected = ref.blocks(ref.case_hessian(case), case.params)
    assert type(result) is list
    assert len(result) == len(case.params)
    for r, e, p in zip(result, expected, case.params):
        assert r.shape == (p.numel(), p.numel())
        assert r.dtype == p.dtype
        assert_close(r, e)


@pytest.mark.parametrize("chunk_size", [1, 3, None])
def test_blocks_chunk_sizes(chunk_size):
    built = build(case_by_id("transformer"))
    result = hessian_blocks(built.func, built.params, chunk_size=chunk_size)
    for r, e in zip(result, ref.blocks(ref.case_hessian(built), built.params)):
        assert_close(r, e)


def test_blocks_one_parameter_stays_a_list():
    x = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    result = hessian_blocks(lambda: x[0] ** 2 * x[1], [x])
    assert type(result) is list
    assert len(result) == 1
    assert_close(result[0], torch.tensor([[4.0, 2.0], [2.0, 0.0]], dtype=torch.float64))


def test_blocks_are_symmetric(case):
    for block in hessian_blocks(case.func, case.params):
        assert_close(block, block.T)


def test_blocks_of_several_dtypes_are_sized_in_each_dtype():
    # sized in the first parameter's dtype, the float64 block got through under float32 sizes
    small = torch.ones(1, requires_grad=True)
    large = torch.ones(100, dtype=torch.float64, requires_grad=True)
    func = lambda: (small**2).sum() + (large**2).sum()  # noqa: E731
    for params in ([small, large], [large, small]):  # 4 + 80,000 bytes
        with pytest.raises(
            ValueError,
            match=r"\(float32, float64\) needs 78\.1 KiB|\(float64, float32\) needs 78\.1 KiB",
        ):
            hessian_blocks(func, params, max_bytes=50_000)
    blocks = hessian_blocks(func, [small, large], max_bytes=80_004)
    assert [b.dtype for b in blocks] == [torch.float32, torch.float64]
