"""The structured exact diagonal end to end: layer rules against the float64 oracle.

Each model is checked against a dense ``torch.func`` Hessian, and its plan
(:func:`~torch_secorder.diagonal_plan`) says which path each layer took and what it cost; the
models are sized so that the rules are cheaper than the generic path where they hold. The
second half holds the models that once fooled the rules (samples reading other samples,
outputs read where the probe is not, parameters reaching the loss another way, one sample,
layers that are nearly but not exactly linear), each now proven or refused by structure.
"""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.core.structured.helpers import CE, F64, check, generic, labels, oracle, randn
from torch_secorder import (
    HessianOperator,
    diagonal_plan,
    model_hessian_diagonal,
    model_hessian_trace,
)
from torch_secorder.core._structured.independence import count


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.GELU(), nn.Linear(4, 3)
    ).to(F64)


def test_linear_layers_on_independent_samples():
    plan = check(_mlp(), CE, randn(9, 5), labels(9, 3))
    assert {name: layer.method for name, layer in plan.items()} == dict.fromkeys(
        ["0", "2", "4"], "layer"
    )
    # U products each; the joint check of the 9 samples (5 sets) counts for the first layer
    assert [plan[name].num_matvecs for name in ("0", "2", "4")] == [6 + 5, 4, 3]


def test_linear_layer_on_one_unbatched_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).to(F64)
    plan = check(model, lambda out, t: (out - t).pow(2).sum(), randn(4), randn(2, seed=5))
    assert [plan[n].method for n in ("0", "2")] == ["layer", "layer"]
    assert plan["0"].num_matvecs == 3


class _Tokens(nn.Module):
    """Embedding, a per-token layer, attention across tokens, and a per-token head."""

    def __init__(self, attend=True, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(9, 4, padding_idx=padding_idx)
        self.inner = nn.Linear(4, 6)
        self.attend = attend
        self.head = nn.Linear(6, 9)

    def forward(self, tokens):
        h = torch.tanh(self.inner(self.embed(tokens)))
        if self.attend:
            weights = torch.softmax(h @ h.transpose(-1, -2) / 2, dim=-1)
            h = weights @ h
        return self.head(h).flatten(0, -2)


def _tokens():
    return torch.tensor([[1, 2, 1, 0], [4, 4, 8, 5], [6, 1, 2, 2]])


def test_layers_over_attending_tokens_use_token_blocks():
    torch.manual_seed(0)
    plan = check(_Tokens().to(F64), CE, _tokens(), labels(12, 9))
    assert plan["embed"].method == "layer"  # 4 units x 4 coupled tokens < 36 weights
    assert "coupled: 1" in plan["embed"].reason
    assert plan["inner"].method == "layer"  # 6 units x 4 coupled tokens < 30
    assert "coupled: 1" in plan["inner"].reason
    assert plan["head"].method == "layer"  # per token: 9 units
    assert "independent output axes: 0, 1" in plan["head"].reason


def test_per_token_layers_need_no_token_blocks():
    torch.manual_seed(0)
    plan = check(_Tokens(attend=False).to(F64), CE, _tokens(), labels(12, 9))
    for name in ("embed", "inner", "head"):
        assert plan[name].method == "layer", name
        assert "coupled: none" in plan[name].reason


def test_embedding_padding_row_has_no_curvature():
    torch.manual_seed(0)
    model = _Tokens(attend=False, padding_idx=0).to(F64)
    check(model, CE, _tokens(), labels(12, 9))
    result = model_hessian_diagonal(model, CE, _tokens(), labels(12, 9))
    assert torch.equal(result[0][0], torch.zeros(4, dtype=F64))


CONVOLUTIONS = {
    "conv1d-stride": (nn.Conv1d(6, 4, 3, stride=2, padding=1), (5, 6, 7)),
    "conv2d-dilation-reflect": (
        nn.Conv2d(6, 4, 3, padding=2, dilation=2, padding_mode="reflect"),
        (4, 6, 3, 3),
    ),
    "conv2d-same-replicate": (
        nn.Conv2d(6, 4, (2, 3), padding="same", padding_mode="replicate"),
        (4, 6, 3, 3),
    ),
    "conv2d-circular-groups": (
        nn.Conv2d(8, 6, 3, padding=1, groups=2, padding_mode="circular"),
        (4, 8, 3, 3),
    ),
    "conv2d-depthwise-valid": (nn.Conv2d(4, 4, 3, padding="valid", groups=4), (4, 4, 4, 4)),
    "conv2d-no-bias": (nn.Conv2d(6, 3, 3, stride=(2, 1), bias=False), (4, 6, 5, 4)),
    "conv3d": (nn.Conv3d(4, 3, 2, padding=(1, 0, 1)), (3, 4, 2, 3, 2)),
}


@pytest.mark.parametrize("name", list(CONVOLUTIONS))
def test_convolutions(name):
    torch.manual_seed(0)
    conv, shape = CONVOLUTIONS[name]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(F64)
    inputs = randn(*shape)
    model(inputs)  # materialise the lazy layer
    plan = check(model, CE, inputs, labels(shape[0], 3))
    assert plan["0"].method == "layer"
    pixels = math.prod(model[0](inputs).shape[2:])
    # pixels coupled, unchecked; the joint check of the samples counts for the first layer
    assert plan["0"].num_matvecs == conv.out_channels * pixels + count(shape[0])


def test_convolution_of_an_unbatched_image():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(6, 3, 3), nn.Tanh(), nn.Flatten(0), nn.Linear(3 * 4, 2))
    model = model.to(F64)
    plan = check(model, lambda out, t: (out - t).pow(2).sum(), randn(6, 4, 4), randn(2, seed=3))
    assert plan["0"].method == "layer"
    assert plan["0"].num_matvecs == 3 * 4


def test_train_mode_batch_norm_couples_the_samples():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    plan = check(model.to(F64), CE, randn(9, 20), labels(9, 3))
    assert plan["0"].method == "layer"
    assert plan["0"].num_matvecs == 9 * 6  # samples coupled: a block per unit
    assert plan["3"].method == "generic"  # 9 x 3 coupled > 21 elements


class _Centred(nn.Module):
    """Samples coupled without BatchNorm: the batch mean is subtracted before the head."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(20, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.head(h - h.mean(0))


def test_the_joint_check_finds_samples_coupled_without_batch_norm():
    torch.manual_seed(0)
    plan = check(_Centred().to(F64), CE, randn(9, 20), labels(9, 3))
    assert plan["inner"].method == "layer"
    assert "coupled: 0" in plan["inner"].reason  # reaches the other samples through the mean
    assert plan["head"].method == "generic"  # coupled too: 27 products > 21


def test_eval_mode_batch_norm_keeps_samples_independent():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    plan = check(model.to(F64).eval(), CE, randn(9, 5), labels(9, 3))
    assert plan["0"].method == "layer"
    assert "coupled: none" in plan["0"].reason


class _Tied(nn.Module):
    """A language model whose decoder reuses the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(9, 4)
        self.inner = nn.Linear(4, 4)

    def forward(self, tokens):
        return F.linear(torch.tanh(self.inner(self.embed(tokens))), self.embed.weight).flatten(
            0, -2
        )


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(self.layer(torch.tanh(self.layer(x))))


def test_tied_weights_take_the_generic_path():
    torch.manual_seed(0)
    plan = check(_Tied().to(F64), CE, _tokens(), labels(12, 9))
    assert plan["embed"].method == "generic"
    assert "also used outside the layer" in plan["embed"].reason
    assert plan["inner"].method == "layer"


def test_a_layer_called_twice_takes_the_generic_path():
    torch.manual_seed(0)
    plan = check(_Twice().to(F64), CE, randn(6, 4), labels(6, 3))
    assert plan["layer"].method == "generic"
    assert "called 2 times" in plan["layer"].reason
    assert plan["head"].method == "layer"


def test_an_output_changed_by_a_hook_takes_the_generic_path():
    model = _mlp()
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    plan = check(model, CE, randn(9, 5), labels(9, 3))
    assert plan["0"].method == "generic"
    assert "MulBackward0" in plan["0"].reason
    assert plan["2"].method == "layer"


class _Penalised(nn.Module):
    """A weight that also enters the output directly (a penalty curving it)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x))) + (self.layer.weight**4).sum()


def test_a_weight_used_elsewhere_too_takes_the_generic_path():
    torch.manual_seed(0)
    plan = check(_Penalised().to(F64), CE, randn(6, 4), labels(6, 3))
    assert plan["layer"].method == "generic"
    assert plan["head"].method == "layer"


def test_only_a_weight_selected():
    model = _mlp()
    plan = check(model, CE, randn(9, 5), labels(9, 3), params=["0.weight", "4.bias"])
    assert plan["0"].method == "layer"
    assert plan["0"].parameters == ("0.weight",)


def test_a_bias_alone_costs_as_much_by_its_rule():
    model = _mlp()
    plan = check(model, CE, randn(9, 5), labels(9, 3), params=["0.bias", "4.weight"])
    assert plan["0"].method == "generic"  # U products either way, and the rule needs checks


def test_a_frozen_weight_and_its_selected_bias():
    model = _mlp()
    model[0].weight.requires_grad_(False)
    plan = check(model, CE, randn(9, 5), labels(9, 3), params=["0.bias", "4.weight", "4.bias"])
    assert plan["0"].parameters == ("0.bias",)


def test_products_of_a_tanh_mlp():
    # each layer takes its rule, U products; count(32) = 7 sets check the samples of all three
    model = _mlp()
    inputs, targets = randn(32, 5), labels(32, 3)
    operator = HessianOperator.from_model(model, CE, (inputs, targets))
    diagonal = operator.diagonal()
    assert_close(diagonal, torch.cat([e.reshape(-1) for e in oracle(model, CE, inputs, targets)]))
    assert operator.num_matvecs == 7 + 6 + 4 + 3 < operator.shape[0]


def test_a_rule_that_would_cost_more_is_not_taken():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(98, 3))
    plan = check(model.to(F64), CE, randn(4, 1, 7, 7), labels(4, 3))
    assert plan["0"].method == "generic"  # 49 pixels x 2 > 20 elements
    assert "more products" in plan["0"].reason
    assert plan["3"].method == "layer"


def test_closure_and_create_graph_agree_with_the_model_form():
    model = _mlp()
    inputs, targets = randn(9, 5), labels(9, 3)
    expected = oracle(model, CE, inputs, targets)
    for r, e in zip(generic(model, CE, inputs, targets), expected):
        assert_close(r, e)
    for r, e in zip(model_hessian_diagonal(model, CE, inputs, targets, True), expected):
        assert_close(r.detach(), e)


def test_structured_diagonal_is_reproducible():
    model = _mlp()
    inputs, targets = randn(9, 5), labels(9, 3)
    first = model_hessian_diagonal(model, CE, inputs, targets)
    second = model_hessian_diagonal(model, CE, inputs, targets)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_a_loss_linear_in_a_layer_has_zero_curvature_without_products():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    plan = check(model, lambda out, t: (out * t).sum(), randn(5, 4), randn(5, 3, seed=2))
    assert plan["2"].method == "zero"
    assert plan["2"].num_matvecs == 0


def test_norm_layers_take_their_rules():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 24), nn.LayerNorm(24), nn.Tanh(), nn.Linear(24, 8), nn.Tanh(), nn.Linear(8, 4)
    ).to(F64)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
        model[1].bias.uniform_(-0.5, 0.5)
    inputs, targets = randn(6, 5, 3), labels(30, 4)

    def loss(out, t):
        return CE(out.flatten(0, 1), t)

    plan = check(model, loss, inputs, targets)
    assert plan["1"].method == "layer"  # 24 units: tokens and samples independent
    assert "coupled: none" in plan["1"].reason


def test_group_norm_over_one_pixel_takes_its_rule():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.GroupNorm(2, 8), nn.Tanh(), nn.Flatten(), nn.Linear(8, 3)
    ).to(F64)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5)
    plan = check(model, CE, randn(5, 3, 3, 3), labels(5, 3))
    assert plan["1"].method == "layer"  # one pixel: 8 units < 16 elements


# ----------------------------------------------------------------------------- once fooled


class _RelativeToFirst(nn.Module):
    """Every sample relative to sample 0, after a ReLU: samples read another sample."""

    def __init__(self, shift=False):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 16), nn.Linear(16, 1)
        self.shift = shift

    def forward(self, x):
        h = torch.relu(self.fc1(x))
        h = h - torch.roll(h, 1, 0) if self.shift else h - h[:1]
        return self.fc2(h)


@pytest.mark.parametrize(("shift", "samples"), [(False, 8), (True, 2), (True, 5)])
def test_samples_reading_another_sample(shift, samples):
    torch.manual_seed(0)
    model = _RelativeToFirst(shift).to(F64)
    plan = check(model, nn.MSELoss(), randn(samples, 4), randn(samples, 1, seed=2))
    assert plan["fc1"].method != "gauss-newton"


class _Sequence(nn.Module):
    """An unbatched sequence whose every position adds position 0 (a conditioning step)."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(4, 12), nn.Linear(12, 3)

    def forward(self, x):
        h = torch.relu(self.inner(x))
        return self.head(h + h[:1])


class _Frames(nn.Module):
    """Convolution features of each frame minus those of the first frame."""

    def __init__(self):
        super().__init__()
        self.conv, self.head = nn.Conv1d(2, 6, 3, padding=1), nn.Linear(6 * 5, 2)

    def forward(self, x):
        h = torch.relu(self.conv(x))
        return self.head((h - h[:1]).flatten(1))


def test_an_unbatched_sequence_reading_its_first_position():
    torch.manual_seed(0)
    plan = check(_Sequence().to(F64), nn.MSELoss(), randn(7, 4), randn(7, 3, seed=2))
    assert plan["inner"].method != "gauss-newton"


def test_frames_relative_to_the_first():
    torch.manual_seed(0)
    check(_Frames().to(F64), nn.MSELoss(), randn(6, 2, 5), randn(6, 2, seed=2))


def _penalty_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)


def test_an_activation_read_by_an_earlier_hook():
    model, acts = _penalty_model(), {}
    model[0].register_forward_hook(lambda mod, args, out: acts.__setitem__("h", out))

    def loss(out, t):
        return F.cross_entropy(out, t) + 0.1 * acts["h"].pow(2).mean()

    plan = check(model, loss, randn(6, 5), labels(6, 3))
    assert plan["0"].method == "generic"
    assert "read elsewhere" in plan["0"].reason


def test_an_activation_read_by_a_global_hook():
    model, acts = _penalty_model(), {}

    def keep(module, args, out):
        if module is model[0]:
            acts["h"] = out

    def loss(out, t):
        return F.cross_entropy(out, t) + 0.1 * acts["h"].pow(2).mean()

    handle = nn.modules.module.register_module_forward_hook(keep)
    try:
        plan = check(model, loss, randn(6, 5), labels(6, 3))
    finally:
        handle.remove()
    assert plan["0"].method == "generic"


class _Cached(nn.Linear):
    """A layer that keeps its output for an activation penalty."""

    def forward(self, x):
        self.cache = super().forward(x)
        return self.cache


def test_a_layer_keeping_its_own_output():
    torch.manual_seed(0)
    model = nn.Sequential(_Cached(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(F64)

    def loss(out, t):
        return F.cross_entropy(out, t) + 0.1 * model[0].cache.pow(2).mean()

    plan = check(model, loss, randn(6, 5), labels(6, 3))
    assert plan["0"].method == "generic"


class _TwoHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head_a, self.head_b = nn.Linear(4, 8), nn.Linear(8, 3), nn.Linear(8, 2)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head_a(h), self.head_b(h)


def test_weight_decay_on_an_unused_head():
    torch.manual_seed(0)
    model = _TwoHeads().to(F64)

    def loss(out, t):
        return F.cross_entropy(out[0], t) + 1e-2 * sum(p.pow(2).sum() for p in model.parameters())

    plan = check(model, loss, randn(6, 4), labels(6, 3))
    assert plan["head_b"].method == "generic"
    assert "does not reach the loss" in plan["head_b"].reason


def test_an_unused_head_without_weight_decay_has_zero_curvature():
    torch.manual_seed(0)
    model = _TwoHeads().to(F64)
    plan = check(model, lambda out, t: F.cross_entropy(out[0], t), randn(6, 4), labels(6, 3))
    assert plan["head_b"].method == "zero"
    assert plan["head_b"].num_matvecs == 0


class _Siamese(nn.Module):
    """An online and a target branch (detached), as in BYOL."""

    def __init__(self):
        super().__init__()
        self.online, self.target = nn.Linear(4, 6), nn.Linear(4, 6)

    def forward(self, x):
        return torch.tanh(self.online(x)), self.target(x).detach()


def test_a_detached_target_branch_under_weight_decay():
    torch.manual_seed(0)
    model = _Siamese().to(F64)

    def loss(out, t):
        decay = 1e-2 * sum(p.pow(2).sum() for p in model.parameters())
        return (out[0] - out[1]).pow(2).mean() + decay

    plan = check(model, loss, randn(6, 4), randn(6, seed=2))
    assert plan["target"].method == "generic"


def test_one_sample_takes_the_gauss_newton_rule():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(F64)
    plan = check(model, CE, randn(1, 4), labels(1, 3))
    assert plan["0"].method == "gauss-newton"
    assert plan["0"].num_matvecs + plan["2"].num_matvecs == 2 * 3  # no checks for one sample


def test_a_last_batch_of_one_sample():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 3)).to(F64)
    x, y = randn(5, 4), labels(5, 3)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    diagonal = HessianOperator.from_model(model, CE, data).diagonal()
    expected = [
        4 * a + b for a, b in zip(oracle(model, CE, x[:4], y[:4]), oracle(model, CE, x[4:], y[4:]))
    ]
    assert_close(diagonal, torch.cat([e.reshape(-1) / 5 for e in expected]))
    trace = model_hessian_trace(model, CE, data, method="exact")
    assert_close(trace.value, diagonal.sum())


class _BatchNormAct(nn.BatchNorm1d):
    """A BatchNorm with its activation inside (as timm's BatchNormAct2d)."""

    def forward(self, x):
        return F.silu(super().forward(x))


def test_a_batch_norm_with_an_activation_inside_at_small_scale():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), _BatchNormAct(16), nn.Linear(16, 3)).eval()
    x, y = 1e-4 * torch.randn(5, 4), labels(5, 3)
    with torch.no_grad():
        model[0].bias.mul_(1e-4)
    result = model_hessian_diagonal(model, CE, x, y, params="1.*")
    for r, e in zip(result, generic(model, CE, x, y, params=["1.weight", "1.bias"])):
        assert_close(r, e)  # float32: same operations, same order, so float32 defaults
    plan = diagonal_plan(model, CE, x, y, params="1.*")
    assert plan.layers[0].method == "generic"
    assert "SiluBackward0" in plan.layers[0].reason


class _ExpLinear(nn.Linear):
    def forward(self, x):
        return F.linear(x, torch.expm1(self.weight), self.bias)


def test_a_linear_map_of_a_function_of_the_weight():
    torch.manual_seed(0)
    model = nn.Sequential(_ExpLinear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(F64)
    with torch.no_grad():
        model[0].weight.mul_(1e-9)
    plan = check(model, CE, randn(5, 4), labels(5, 3))
    assert plan["0"].method == "generic"


class _OnceTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return a.tanh()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        (a,) = ctx.saved_tensors
        return grad * (1 - a.tanh() ** 2)


class _Cut(nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.last = nn.Linear(4, 4), nn.Linear(4, 3)

    def forward(self, x):
        return self.last(_OnceTanh.apply(self.first(x)))


def test_a_cut_second_derivative_is_reported():
    torch.manual_seed(0)
    model = _Cut().to(F64)
    x, y = randn(5, 4), labels(5, 3)
    with pytest.warns(RuntimeWarning, match=r"params\[0\] \('first.weight'\).*once_differentiable"):
        model_hessian_diagonal(model, CE, x, y)
    with pytest.raises(ValueError, match=r"'first.bias'\) passes through a backward"):
        model_hessian_diagonal(model, CE, x, y, strict=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model_hessian_diagonal(model, CE, x, y, params="last.*")  # its gradient is whole


@pytest.mark.parametrize("where", ["hook", "cache"])
def test_a_held_output_modified_in_place_later(where):
    # the next module's in-place ReLU modifies the output the hook (or cache) holds; a probe
    # would make a new tensor and leave the held one unmodified, so the layer goes generic
    torch.manual_seed(0)
    first = _Cached(5, 8) if where == "cache" else nn.Linear(5, 8)
    model = nn.Sequential(first, nn.ReLU(inplace=True), nn.Linear(8, 3)).to(F64)
    acts = {}
    if where == "hook":
        first.register_forward_hook(lambda mod, args, out: acts.__setitem__("h", out))

    def loss(out, t):
        held = first.cache if where == "cache" else acts["h"]
        return F.cross_entropy(out, t) + 0.1 * held.pow(2).mean()

    plan = check(model, loss, randn(6, 5), labels(6, 3))
    assert plan["0"].method == "generic"
    assert "modified in place" in plan["0"].reason


class _EditsItsCache(nn.Module):
    """A hook keeps the first layer's output; the forward doubles it in place through the cache
    (the tensor the rest of the pass reads, as it is without probes)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 6), nn.Linear(6, 3)
        self.a.register_forward_hook(lambda mod, args, out: setattr(self, "cache", out))

    def forward(self, x):
        h = self.a(x)
        self.cache.mul_(2.0)
        return self.b(torch.tanh(h))


def test_a_held_output_modified_in_place_through_its_holder():
    torch.manual_seed(0)
    plan = check(_EditsItsCache().to(F64), CE, randn(4, 5), labels(4, 3))
    assert plan["a"].method == "generic"
    assert "modified in place" in plan["a"].reason


def test_the_model_output_modified_in_place_by_the_loss():
    # a hook keeps the model's output and the loss triples it in place before reading it
    model, kept = _penalty_model(), {}
    model.register_forward_hook(lambda mod, args, out: kept.__setitem__("out", out))

    def loss(out, t):
        kept["out"].mul_(3.0)
        return F.cross_entropy(out, t)

    plan = check(model, loss, randn(6, 5), labels(6, 3))
    assert all(layer.method != "gauss-newton" for layer in plan.values())


class Clamp(torch.autograd.Function):
    """A smooth function whose class shares the name of PyTorch's piecewise-linear clamp."""

    generate_vmap_rule = True

    @staticmethod
    def forward(z):
        return torch.tanh(z)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(z) ** 2)


class _CustomClamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 32), nn.Linear(32, 2)

    def forward(self, x):
        return self.b(Clamp.apply(self.a(x)))


@pytest.mark.parametrize("n", [1, 4])
def test_a_custom_function_is_not_taken_for_the_operation_of_its_name(n):
    # its node, ClampBackward, once read as clamp's: the Gauss-Newton rule then dropped the
    # function's curvature (relative errors near 1)
    torch.manual_seed(0)
    plan = check(_CustomClamp().to(F64), CE, randn(n, 5), labels(n, 2))
    assert plan["a"].method != "gauss-newton"


def _plain(model, loss_fn, inputs, targets):
    """The diagonal by plain double backward (the oracle where torch.func cannot trace)."""
    params = list(model.parameters())
    H = ref.double_backward_hessian(lambda: loss_fn(model(inputs), targets), params)
    return ref.diagonal(H, params)


class _ClippedActivation(nn.Module):
    """A ReLU network whose hidden activation's gradient is clipped by a tensor hook."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(32, 2)

    def forward(self, x):
        h = torch.relu(self.a(x))
        if h.requires_grad:
            h.register_hook(lambda grad: grad.clamp(-1e-3, 1e-3))
        return self.b(h)


def test_a_gradient_hook_registered_in_the_forward_pass_takes_the_generic_path():
    # the Gauss-Newton rule's own backward passes ran the hook on other cotangents (errors
    # of 3e-3 on entries of 1)
    torch.manual_seed(0)
    model, inputs, targets = _ClippedActivation().to(F64), randn(3, 8), randn(3, 2, seed=2)
    expected = _plain(model, nn.MSELoss(), inputs, targets)
    plan = check(model, nn.MSELoss(), inputs, targets, expected=expected)
    assert {layer.method for layer in plan.values()} == {"generic"}
    assert "gradient hook" in plan["a"].reason


def test_a_gradient_hook_on_a_parameter_takes_its_layer_generic():
    # a layer rule reads the diagonal off the layer's output, past the parameter's hook
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 40)).to(F64)
    model[0].weight.register_hook(lambda grad: grad.clamp(-1e-3, 1e-3))
    inputs, targets = randn(3, 8), labels(3, 40)
    plan = check(model, CE, inputs, targets, expected=_plain(model, CE, inputs, targets))
    assert plan["0"].method == "generic"
    assert "its weight has a gradient hook" in plan["0"].reason
    assert plan["2"].method == "layer"


@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # (the inputs need none)
@pytest.mark.parametrize("where", ["module", "global"])
def test_a_module_backward_hook_takes_every_layer_generic(where):
    # it runs in the rules' own backward passes too, on other cotangents (errors of 0.03 on
    # entries of 0.06 from a clamp)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2))
    model = model.to(F64)

    def clamp(module, grad_output):
        return (grad_output[0].clamp(-0.05, 0.05),)

    inputs, targets = randn(8, 4), randn(8, 2, seed=2)
    if where == "module":
        handle = model.register_full_backward_pre_hook(clamp)
    else:
        handle = nn.modules.module.register_module_full_backward_pre_hook(clamp)
    try:
        expected = _plain(model, nn.MSELoss(), inputs, targets)
        plan = check(model, nn.MSELoss(), inputs, targets, expected=expected)
    finally:
        handle.remove()
    assert {layer.method for layer in plan.values()} == {"generic"}
    assert "backward hook" in plan["0"].reason


class _SqueezedConv(nn.Conv1d):
    """A convolution whose output loses its last (length-1) axis: (N, C, 1) to (N, C)."""

    def forward(self, x):
        return super().forward(x).squeeze(-1)


@pytest.mark.parametrize("squeeze", ["last", "noop-first"])
def test_a_convolution_squeezed_otherwise_than_unbatched(squeeze):
    # any squeeze above the convolution was read as an unbatched input's: the rule then
    # reshaped sample 0's patches and raised
    torch.manual_seed(0)
    if squeeze == "last":
        conv = _SqueezedConv(2, 3, 4)
    else:  # squeeze(0) of a batch of 2: no axis removed, but a node recorded
        conv = nn.Conv1d(2, 3, 4)
        conv.register_forward_hook(lambda mod, args, out: out.squeeze(0))
    model = nn.Sequential(conv, nn.Flatten(), nn.Tanh(), nn.Linear(3, 2)).to(F64)
    plan = check(model, CE, randn(2, 2, 4), labels(2, 2))
    assert plan["0"].method == "generic"


class _Modulus(nn.Module):
    """A complex number's modulus between two layers: not piecewise linear."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 32), nn.Linear(16, 2)

    def forward(self, x):
        z = self.a(x)
        return self.b((z[:, :16] + 1j * z[:, 16:]).abs())


def test_the_modulus_of_a_complex_number_is_not_piecewise_linear():
    # its node is Abs, piecewise linear on real numbers: the Gauss-Newton rule took it (errors
    # of 1.3 on entries of 2)
    torch.manual_seed(0)
    model, inputs, targets = _Modulus().to(F64), randn(3, 8), randn(3, 2, seed=2)
    expected = _plain(model, nn.MSELoss(), inputs, targets)
    plan = check(model, nn.MSELoss(), inputs, targets, expected=expected)
    assert plan["a"].method != "gauss-newton"


def test_a_budget_below_every_plan_runs_no_check():
    from torch_secorder.core._model import batch_loss
    from torch_secorder.core._structured import StructuredDiagonal

    model, inputs, targets = _mlp(), randn(32, 5), labels(32, 3)
    names = [n for n, _ in model.named_parameters()]

    def plan(budget):
        return StructuredDiagonal(
            batch_loss(model, CE, inputs, targets), model, list(model.parameters()),
            fname="test", names=names, strict=False, seed=0, locate=None, chunk_size=None,
            budget=budget,
        )  # fmt: skip

    with plan(12) as cut:  # at least 6 + 4 + 3 products even if every check were free
        assert cut.over_budget
        assert cut.graph.num_products == 0
        assert sum(cut.costs) == sum(p.numel() for p in model.parameters())
    with plan(13) as full:
        assert not full.over_budget
        assert sum(full.costs) == 7 + 6 + 4 + 3
