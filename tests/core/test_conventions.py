"""Conventions shared by every core function: grad modes, dtypes and devices, structure."""

import pytest
import torch
from torch.testing import assert_close

from tests.cases import build, case_by_id
from tests.core.helpers import CALLS, tensors_of


def _assert_same(result, expected, **tolerances):
    got, want = tensors_of(result), tensors_of(expected)
    assert type(result) is type(expected)
    assert len(got) == len(want)
    for a, b in zip(got, want):
        assert_close(a, b, **tolerances)


@pytest.mark.parametrize("name", list(CALLS))
def test_works_under_no_grad(name):
    built = build(case_by_id("cnn-bn-eval"))
    expected = CALLS[name](built)
    with torch.no_grad():
        result = CALLS[name](built)
    _assert_same(result, expected)


@pytest.mark.parametrize("name", list(CALLS))
def test_works_under_inference_mode(name):
    # tensors created outside inference mode; the forward runs with inference mode off
    built = build(case_by_id("mlp-tanh-ce"))
    expected = CALLS[name](built)
    with torch.inference_mode():
        result = CALLS[name](built)
    _assert_same(result, expected)


def test_grad_mode_is_restored_inside_no_grad():
    built = build(case_by_id("mse-mean"))
    with torch.no_grad():
        CALLS["hvp"](built)
        assert not torch.is_grad_enabled()


@pytest.mark.parametrize("name", list(CALLS))
def test_float32_keeps_dtype_and_device(name):
    # float32 only checks dtype and device, against float64 with float32 tolerances
    built32 = build(case_by_id("mlp-tanh-ce"), dtype=torch.float32)
    built64 = build(case_by_id("mlp-tanh-ce"))
    result = CALLS[name](built32)
    expected = CALLS[name](built64)
    for r in tensors_of(result):
        assert r.dtype == torch.float32
        assert r.device == built32.params[0].device
    expected = [e.float() for e in expected] if isinstance(expected, list) else expected.float()
    _assert_same(result, expected)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", list(CALLS))
@pytest.mark.parametrize("case_id", ["cnn-bn-train", "attention", "dropout", "gru"])
def test_cuda_results_stay_on_the_device_and_match_cpu(name, case_id):
    gpu = build(case_by_id(case_id), device="cuda")
    cpu = build(case_by_id(case_id))
    cuda_rng = torch.cuda.get_rng_state()
    result = CALLS[name](gpu)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    for r in tensors_of(result):
        assert r.device.type == "cuda"
        assert r.dtype == torch.float64
    if case_id != "dropout":  # CUDA draws other dropout masks than the CPU
        expected = CALLS[name](cpu)
        for r, e in zip(tensors_of(result), tensors_of(expected)):
            assert_close(r.cpu(), e)


def test_case_build_leaves_global_state_alone():
    state, dtype = torch.get_rng_state(), torch.get_default_dtype()
    build(case_by_id("dropout"), dtype=torch.float32)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_default_dtype() == dtype


def test_results_do_not_require_grad_by_default(case):
    for name in ["hvp", "batched_hvp", "hessian_diagonal", "hessian_matrix"]:
        for r in tensors_of(CALLS[name](case)):
            assert not r.requires_grad
            assert r.grad_fn is None
