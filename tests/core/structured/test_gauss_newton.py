"""The Gauss-Newton rule: taken where the path to the output is piecewise linear, refused
elsewhere, exact against the float64 oracle either way."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tests.core.structured.helpers import CE, F64, check, generic, labels, randn
from torch_secorder import HessianOperator, model_hessian_diagonal
from torch_secorder.core._structured import gauss_newton


class _Lambda(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


_CONSTANT = randn(24, seed=7)
_MASK = randn(24, seed=8) > 0
_INDEX = torch.tensor([3, 0, 0, 7, 23, 11, 5, 5])

PIECEWISE_LINEAR = {
    "relu": F.relu,
    "hardtanh-any-bounds": lambda x: F.hardtanh(x, -0.2, 0.7),
    "relu6": F.relu6,
    "leaky-relu": F.leaky_relu,
    "threshold": lambda x: F.threshold(x, 0.1, -0.5),
    "abs": torch.abs,
    "clamp": lambda x: x.clamp(-0.3, 0.4),
    "clamp-min": lambda x: x.clamp(min=0.1),
    "clamp-tensor-bounds": lambda x: x.clamp(min=_CONSTANT.to(x) - 1, max=_CONSTANT.to(x)),
    "where": lambda x: torch.where(_MASK, x, -2 * x),
    "masked-fill": lambda x: x.masked_fill(_MASK, 0.5),
    "flip": lambda x: x.flip(1),
    "roll": lambda x: torch.roll(x, 5, 1),
    "cumsum": lambda x: x.cumsum(1),
    "index-select": lambda x: x.index_select(1, _INDEX),
    "gather": lambda x: x.gather(1, _INDEX.expand(x.shape[0], -1)),
    "indexing": lambda x: x[:, _INDEX],
    "maximum": lambda x: torch.maximum(x, x.flip(1)),
    "minimum": lambda x: torch.minimum(x, _CONSTANT.to(x)),
    "amax": lambda x: x.view(-1, 6, 4).amax(-1),
    "amin": lambda x: x.view(-1, 6, 4).amin(1),
    "max-values": lambda x: x.view(-1, 6, 4).max(-1).values,
    "sort-values": lambda x: x.sort(1).values,
    "topk-values": lambda x: x.topk(9, 1).values,
    "constant-pad": lambda x: F.pad(x, (2, 1), value=0.3),
    "reflection-pad": lambda x: F.pad(x.view(-1, 4, 6), (2, 2), mode="reflect").flatten(1),
    "replication-pad": lambda x: F.pad(x.view(-1, 4, 6), (1, 2), mode="replicate").flatten(1),
    "nearest-up-sampling": lambda x: F.interpolate(x.view(-1, 4, 6), scale_factor=2).flatten(1),
    "bilinear-up-sampling": lambda x: F.interpolate(
        x.view(-1, 1, 4, 6), scale_factor=2, mode="bilinear"
    ).flatten(1),
    "pixel-shuffle": lambda x: F.pixel_shuffle(x.view(-1, 4, 2, 3), 2).flatten(1),
    "pixel-unshuffle": lambda x: F.pixel_unshuffle(x.view(-1, 1, 4, 6), 2).flatten(1),
    "max-pool": lambda x: F.max_pool1d(x.view(-1, 4, 6), 2).flatten(1),
    "prelu-of-a-constant-slope": lambda x: F.prelu(x, torch.tensor([0.25], dtype=x.dtype)),
    "dropout-mask": lambda x: x * _MASK,
}


@pytest.mark.parametrize("name", list(PIECEWISE_LINEAR))
def test_a_piecewise_linear_operation_keeps_the_rule(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 24), _Lambda(PIECEWISE_LINEAR[name]), nn.LazyLinear(3))
    inputs = randn(5, 4)
    model(inputs.float())
    model = model.to(F64)
    plan = check(model, CE, inputs, labels(5, 3))
    assert plan["0"].method == "gauss-newton"
    assert plan["2"].method == "gauss-newton"


NOT_PIECEWISE_LINEAR = {
    "tanh": torch.tanh,
    "softplus": F.softplus,
    "square": torch.square,
    "a-gate": lambda x: x * torch.sigmoid(x),
    "a-product-of-two-paths": lambda x: x * F.relu(x),
    "a-quotient-by-itself": lambda x: x / (1 + x.abs()),
    "softmax": lambda x: torch.softmax(x, 1),
    "circular-pad": lambda x: F.pad(x.view(-1, 4, 6), (1, 1), mode="circular").flatten(1),
}


@pytest.mark.parametrize("name", list(NOT_PIECEWISE_LINEAR))
def test_an_operation_with_curvature_keeps_the_layer_rules(name):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 24), _Lambda(NOT_PIECEWISE_LINEAR[name]), nn.LazyLinear(3))
    inputs = randn(5, 4)
    model(inputs.float())
    plan = check(model.to(F64), CE, inputs, labels(5, 3))
    assert plan["0"].method != "gauss-newton"


class _ReluNet(nn.Module):
    """Convolutions, running-statistics BatchNorm, in-place ReLU, pooling, a shortcut, a head."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(4)
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        h = F.relu(self.norm(self.stem(x)), inplace=True)
        h = self.pool(F.relu(self.conv(h)) + h)
        return self.head(1 - F.adaptive_avg_pool2d(h, 1).flatten(1) / 2)  # linear: kept


def _relu_net():
    torch.manual_seed(0)
    model = _ReluNet()
    with torch.no_grad():
        model.norm.running_mean.uniform_(-0.5, 0.5)
        model.norm.running_var.uniform_(0.5, 2.0)
    return model.to(F64).eval()


def test_a_piecewise_linear_network_takes_the_rule():
    inputs, targets = randn(6, 2, 6, 6), labels(6, 3)
    plan = check(_relu_net(), CE, inputs, targets)
    assert {name for name, layer in plan.items() if layer.method == "gauss-newton"} == {
        "stem",
        "norm",
        "conv",
        "head",
    }
    # 3 output products and 3 backward passes, 4 + 4 checks over 6 samples (4 sets)
    assert sum(layer.num_matvecs for layer in plan.values()) == 2 * (3 + 4)


def test_the_rule_with_an_output_per_token():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).to(F64)
    plan = check(model, nn.MSELoss(), randn(5, 3, 4), randn(5, 3, 2, seed=2))
    assert plan["0"].method == plan["2"].method == "gauss-newton"  # 3 tokens x 2 outputs


def test_a_nonlinear_path_keeps_the_layer_rules():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3)
    ).to(F64)
    plan = check(model, CE, randn(8, 5), labels(8, 3))
    assert plan["0"].method == "layer"  # its path has a tanh
    assert plan["2"].method == plan["4"].method == "gauss-newton"


def test_train_mode_batch_norm_on_the_path_keeps_the_layer_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 3))
    plan = check(model.to(F64), CE, randn(8, 5), labels(8, 3))
    assert plan["0"].method != "gauss-newton"


class _Mixed(nn.Module):
    """Piecewise linear, but each output sees every sample (the batch mean is subtracted)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = F.relu(self.inner(x))
        return self.head(h - h.mean(0))


def test_samples_mixed_before_the_output_keep_the_layer_rules():
    torch.manual_seed(0)
    plan = check(_Mixed().to(F64), CE, randn(8, 5), labels(8, 3))
    assert plan["inner"].method != "gauss-newton"  # its Jacobian reaches the other samples


def test_a_loss_coupling_the_samples_keeps_the_layer_rules():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3)).to(F64)

    def coupled(outputs, targets):
        return outputs.sum(0).square().sum() + CE(outputs, targets)

    plan = check(model, coupled, randn(8, 5), labels(8, 3))
    assert all(layer.method != "gauss-newton" for layer in plan.values())


def test_a_loss_reading_an_activation_past_the_output_keeps_the_layer_rules():
    torch.manual_seed(0)
    model, acts = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3)).to(F64), {}
    model[1].register_forward_hook(lambda module, args, out: acts.__setitem__("h", out))

    def loss(outputs, targets):
        return CE(outputs, targets) + acts["h"].pow(2).mean()

    plan = check(model, loss, randn(8, 5), labels(8, 3))
    assert plan["0"].method != "gauss-newton"


def test_a_bias_with_a_frozen_weight():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3)).to(F64)
    model[0].weight.requires_grad_(False)
    plan = check(model, CE, randn(8, 5), labels(8, 3), params=["0.bias", "2.weight"])
    assert plan["0"].method == "gauss-newton"


def test_a_norm_layer_before_a_linear_head():
    torch.manual_seed(0)
    norm = nn.RMSNorm(24) if hasattr(nn, "RMSNorm") else nn.LayerNorm(24)
    model = nn.Sequential(nn.Linear(5, 24), nn.Tanh(), norm, nn.Linear(24, 2)).to(F64)
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
    plan = check(model, CE, randn(6, 5), labels(6, 2))
    assert plan["2"].method == plan["3"].method == "gauss-newton"


def test_the_rule_is_reproducible_and_leaves_no_hooks():
    model = _relu_net()
    inputs, targets = randn(6, 2, 6, 6), labels(6, 3)
    first = model_hessian_diagonal(model, CE, inputs, targets)
    second = model_hessian_diagonal(model, CE, inputs, targets)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert all(not m._forward_hooks for m in model.modules())


def test_outputs_too_large_per_sample_keep_the_layer_rules(monkeypatch):
    monkeypatch.setattr(gauss_newton, "OUTPUT_BLOCK_BYTES", 6 * 3 * 3 * 8 - 1)
    plan = check(_relu_net(), CE, randn(6, 2, 6, 6), labels(6, 3))
    assert all(layer.method != "gauss-newton" for layer in plan.values())


def test_train_mode_dropout_takes_the_rule():
    # the mask multiplies the activations: linear, so the rule holds for the masks drawn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3)
    ).to(F64)
    inputs, targets = randn(8, 5), labels(8, 3)
    plan = check(model, CE, inputs, targets, expected=generic(model, CE, inputs, targets))
    assert {plan[n].method for n in ("0", "3", "5")} == {"gauss-newton"}


def test_the_operator_counts_the_rules_products():
    model = _relu_net()
    inputs, targets = randn(6, 2, 6, 6), labels(6, 3)
    operator = HessianOperator.from_model(model, CE, (inputs, targets))
    with operator:
        diagonal = operator.diagonal()
    assert operator.num_matvecs == 2 * (3 + 4) < operator.shape[0]
    assert_close(diagonal, torch.cat([d.reshape(-1) for d in generic(model, CE, inputs, targets)]))
