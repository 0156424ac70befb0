"""Activation and input Hessians of the real architectures against split-model oracles.

The oracle Hessian is taken with respect to perturbations added to the chosen modules' outputs
(the model split at each module) or to the inputs, batch by batch, block diagonal over the
batches with weights :math:`n_b / N`. Where the forward pass is deterministic it is
``torch.func``'s (``tests/reference.py``); with dropout in train mode, whose masks
``torch.func`` does not reproduce through ``nn.LSTM`` and attention, it is plain double
backward (``tests/real/oracle.py``), which :func:`test_the_two_oracles_agree` checks against
``torch.func`` where both apply. For the LSTM language model, whose inputs are token indices,
the embedding's output stands for the input.
"""

import copy
import functools

import pytest
import torch
from torch.testing import assert_close

import torch_secorder as ts
from tests import reference as ref
from tests.real import oracle
from tests.real.helpers import arch_params, checked, reproducible
from tests.real.models import Arch, build

ARCHS = ("resnet", "vit", "lstm")

MODULES = {
    "resnet": ["layer2.0.bn2", "fc"],  # a BatchNorm output added to in place, and the logits
    "vit": ["patch_embed", "encoder.layers.0.linear2", "head"],
    "lstm": ["encoder", "decoder"],
}
"""Per architecture, modules whose outputs are the variables (a few dozen entries per sample)."""

INPUTS = {"resnet": None, "vit": None, "lstm": ["encoder"]}
"""The variables standing for the inputs: the images, or the embedding of the tokens."""


def _data(arch: Arch, kind: str):
    return arch.batches[:1] if kind == "batch" else arch.batches


@functools.cache
def expected(name: str, mode: str, kind: str, wrt: str, plain: bool = False) -> torch.Tensor:
    """The oracle Hessian (cached: the architectures are built once and left unchanged)."""
    arch = build(name, mode)
    modules = MODULES[name] if wrt == "activations" else INPUTS[name]
    batches = _data(arch, kind)
    if arch.stochastic or plain:
        return oracle.variable_hessian(arch.model, arch.loss_fn, batches, modules)
    return ref.variable_hessian(arch.model, arch.loss_fn, batches, modules)


def operator(arch: Arch, kind: str, wrt: str) -> ts.HessianOperator:
    if wrt == "inputs" and INPUTS[arch.name] is not None:
        wrt, modules = "activations", INPUTS[arch.name]
    else:
        modules = MODULES[arch.name] if wrt == "activations" else None
    return ts.HessianOperator.from_model(
        arch.model, arch.loss_fn, arch.library_data(kind), wrt=wrt, modules=modules
    )


def forms(arch: Arch, wrt: str) -> dict:
    if wrt == "inputs" and INPUTS[arch.name] is not None:
        return {"wrt": "activations", "modules": INPUTS[arch.name]}
    return {"wrt": wrt, "modules": MODULES[arch.name] if wrt == "activations" else None}


@pytest.fixture(params=arch_params(ARCHS))
def real(request: pytest.FixtureRequest) -> Arch:
    return build(*request.param)


@pytest.mark.parametrize("wrt", ["activations", "inputs"])
def test_products_and_diagonal_match_the_oracle(real, kind, wrt):
    H_true = expected(real.name, real.mode, kind, wrt)
    H = checked(real.model, operator, real, kind, wrt)
    assert H.shape == H_true.shape
    V = torch.randn(H.shape[0], 3, dtype=H.dtype, generator=torch.Generator().manual_seed(0))
    assert_close(checked(real.model, H.matmat, V), H_true @ V)
    assert_close(checked(real.model, H.diagonal), torch.diagonal(H_true))


@pytest.mark.parametrize("wrt", ["activations", "inputs"])
def test_exact_traces_and_top_eigenvalue(real, kind, wrt):
    H_true = expected(real.name, real.mode, kind, wrt)
    kwargs = forms(real, wrt)
    data = real.library_data(kind)
    traces = reproducible(
        real.model,
        ts.model_hessian_trace,
        real.model,
        real.loss_fn,
        data,
        groups="input" if kwargs["wrt"] == "inputs" else "module",
        method="exact",
        **kwargs,
    )
    H = operator(real, kind, wrt)
    offset, blocks = 0, {name: [] for name in traces}
    for _, name, shape in H.variables:
        blocks[name].extend(range(offset, offset + shape.numel()))
        offset += shape.numel()
    for name, rows in blocks.items():
        assert_close(traces[name].value, H_true[rows][:, rows].trace())
    top = checked(real.model, ts.model_top_eigenvalues, real.model, real.loss_fn, data, **kwargs)
    assert top.converged
    assert_close(top.eigenvalues[0], torch.linalg.eigvalsh(H_true)[-1], rtol=1e-4, atol=1e-10)


def test_per_sample_trace_and_top_eigenvalue_of_the_inputs(real, kind):
    H_true = expected(real.name, real.mode, kind, "inputs")
    kwargs = forms(real, "inputs")
    data = real.library_data(kind)
    traces = checked(
        real.model,
        ts.model_hessian_trace,
        real.model,
        real.loss_fn,
        data,
        groups="sample",
        method="exact",
        **kwargs,
    )
    tops = checked(
        real.model,
        ts.model_top_eigenvalues,
        real.model,
        real.loss_fn,
        data,
        groups="sample",
        **kwargs,
    )
    sizes = [x.shape[0] for x, _ in _data(real, kind)]
    per_sample = H_true.shape[0] // sum(sizes)
    assert list(traces) == list(tops) == list(range(sum(sizes)))
    for i in range(sum(sizes)):
        rows = slice(i * per_sample, (i + 1) * per_sample)
        block = sum(sizes) * H_true[rows, rows]  # the sample's own loss (N H)
        assert_close(traces[i].value, block.trace())
        assert traces[i].method == "exact"
        assert_close(
            tops[i].eigenvalues[0], torch.linalg.eigvalsh(block)[-1], rtol=1e-4, atol=1e-10
        )


@pytest.mark.parametrize("name", ["resnet", "vit"])
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_linear_weight_hessian_is_the_activation_hessian_contracted_with_inputs(name, mode, kind):
    # H_W[(a,p),(c,q)] = sum_b sum_ij H_z[b][(i,a),(j,c)] x_bi[p] x_bj[q] for z = x W^T + c
    arch = build(name, mode)
    layer_name = MODULES[name][-1]
    layer = dict(arch.model.named_modules())[layer_name]
    data = arch.library_data(kind)
    op = ts.HessianOperator.from_model(
        arch.model, arch.loss_fn, data, params=f"{layer_name}.weight"
    )
    HW = checked(arch.model, op.matmat, torch.eye(op.shape[0], dtype=op.dtype))
    Hz = ts.HessianOperator.from_model(
        arch.model, arch.loss_fn, data, wrt="activations", modules=layer_name
    )
    Hz = checked(arch.model, Hz.matmat, torch.eye(Hz.shape[0], dtype=Hz.dtype))
    out, inp = layer.weight.shape
    contracted = torch.zeros(out, inp, out, inp, dtype=Hz.dtype)
    offset = 0
    for b, (x, _) in enumerate(_data(arch, kind)):
        seen: list = []
        hook = layer.register_forward_hook(lambda m, args, o, seen=seen: seen.append(args[0]))
        try:
            with oracle.forward_context(b), torch.no_grad():
                copy.deepcopy(arch.model)(x)  # a copy: the model's buffers stay as they are
        finally:
            hook.remove()
        n = x.shape[0]
        block = Hz[offset : offset + n * out, offset : offset + n * out].reshape(n, out, n, out)
        contracted += torch.einsum("iajc,ip,jq->apcq", block, seen[0], seen[0])
        offset += n * out
    assert_close(HW, contracted.reshape(out * inp, out * inp))


@pytest.mark.parametrize(("name", "mode"), [("resnet", "train"), ("vit", "eval"), ("lstm", "eval")])
def test_the_two_oracles_agree(name, mode):
    for wrt in ("activations", "inputs"):
        assert_close(
            expected(name, mode, "batches", wrt, plain=True), expected(name, mode, "batches", wrt)
        )


def test_token_inputs_are_refused_and_shared_modules_named():
    lstm = build("lstm", "train")
    with pytest.raises(ValueError, match="wrt='inputs' needs floating-point inputs"):
        ts.model_hessian_trace(lstm.model, lstm.loss_fn, lstm.batch, wrt="inputs")
    with pytest.raises(TypeError, match="modules selects 'rnn', which returns a tuple"):
        ts.HessianOperator.from_model(
            lstm.model, lstm.loss_fn, lstm.batch, wrt="activations", modules="rnn"
        )
    resnet = build("resnet", "train")
    with pytest.raises(
        ValueError, match="modules selects 'layer1.0.relu', which is called 2 times"
    ):
        ts.HessianOperator.from_model(
            resnet.model, resnet.loss_fn, resnet.batch, wrt="activations", modules="layer1.0.relu"
        )
    vit = build("vit", "train")
    with pytest.raises(TypeError, match="'encoder.layers.0.self_attn', which returns a tuple"):
        ts.HessianOperator.from_model(
            vit.model,
            vit.loss_fn,
            vit.batch,
            wrt="activations",
            modules="encoder.layers.0.self_attn",
        )
