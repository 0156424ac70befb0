"""The structured exact diagonal: layer rules against the float64 oracle, and their checks.

Each model is run with the rule forced wherever its checks pass (the comparison with the
generic path's cost set aside), so that every rule is exercised on small layers, and the
layers that took it are recorded.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from tests import reference as ref
from tests.core.helpers import assert_unchanged, snapshot
from torch_secorder import HessianOperator, hessian_diagonal, model_hessian_diagonal
from torch_secorder.core import _structure

F64 = torch.float64


@pytest.fixture
def ruled(monkeypatch):
    """Force the rule where its checks pass; return the list of (layer, rule) that took it."""
    taken = []
    apply = _structure._apply

    def spy(graph, layer, probe_index, rule, chunk_size):
        taken.append((layer.module, rule))
        return apply(graph, layer, probe_index, rule, chunk_size)

    monkeypatch.setattr(_structure, "_generic_products", lambda layer, params: math.inf)
    monkeypatch.setattr(_structure, "_apply", spy)
    return taken


def _oracle(model, loss_fn, inputs, targets):
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    params = [dict(model.named_parameters())[n] for n in names]
    args = inputs if isinstance(inputs, tuple) else (inputs,)

    def loss(*tensors):
        buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
        out = torch.func.functional_call(model, ({**dict(zip(names, tensors))}, buffers), args)
        return loss_fn(out, targets)

    return ref.diagonal(ref.hessian(loss, params), params)


def _check(model, loss_fn, inputs, targets):
    model = model.to(F64)
    expected = _oracle(model, loss_fn, inputs, targets)
    before = snapshot(model)
    result = model_hessian_diagonal(model, loss_fn, inputs, targets)
    assert_unchanged(before, model)
    for r, e in zip(result, expected):
        assert_close(r, e)
    return model


def _randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _labels(n, classes, seed=1):
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


CE = nn.CrossEntropyLoss()


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4, bias=False), nn.GELU(), nn.Linear(4, 3)
    )


def test_linear_layers_on_independent_samples(ruled):
    model = _check(_mlp(), CE, _randn(9, 5), _labels(9, 3))
    assert [m for m, _ in ruled] == [model[0], model[2], model[4]]
    for _, rule in ruled:
        assert rule.independent == [0]
        assert rule.coupled == []


def test_linear_layer_on_one_unbatched_sample(ruled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    _check(model, lambda out, t: (out - t).pow(2).sum(), _randn(4), _randn(2, seed=5))
    assert len(ruled) == 2


class _Tokens(nn.Module):
    """Embedding, a per-token layer, attention across tokens, and a per-token head."""

    def __init__(self, attend=True, padding_idx=None):
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=padding_idx)
        self.inner = nn.Linear(4, 4)
        self.attend = attend
        self.head = nn.Linear(4, 7)

    def forward(self, tokens):
        h = torch.tanh(self.inner(self.embed(tokens)))
        if self.attend:
            weights = torch.softmax(h @ h.transpose(-1, -2) / 2, dim=-1)
            h = weights @ h
        return self.head(h).flatten(0, -2)


def _tokens():
    return torch.tensor([[1, 2, 1, 0, 3], [4, 4, 4, 5, 0], [6, 1, 2, 2, 1]])


def test_layers_over_attending_tokens_use_token_blocks(ruled):
    tokens = _tokens()
    torch.manual_seed(0)
    model = _check(_Tokens(), CE, tokens, _labels(15, 7))
    rules = {module: rule for module, rule in ruled}
    assert rules[model.embed].coupled == [1]
    assert rules[model.embed].independent == [0]
    assert rules[model.inner].coupled == [1]
    assert rules[model.head].coupled == []
    assert rules[model.head].independent == [0, 1]


def test_per_token_layers_need_no_token_blocks(ruled):
    torch.manual_seed(0)
    model = _check(_Tokens(attend=False), CE, _tokens(), _labels(15, 7))
    assert all(rule.coupled == [] for _, rule in ruled)
    assert {m for m, _ in ruled} == {model.embed, model.inner, model.head}


def test_embedding_padding_row_has_no_curvature(ruled):
    torch.manual_seed(0)
    model = _check(_Tokens(padding_idx=0), CE, _tokens(), _labels(15, 7))
    result = model_hessian_diagonal(model, CE, _tokens(), _labels(15, 7))
    assert torch.equal(result[0][0], torch.zeros(4, dtype=F64))


CONVOLUTIONS = {
    "conv1d-stride": (nn.Conv1d(2, 4, 3, stride=2, padding=1), (5, 2, 9)),
    "conv2d-dilation-reflect": (
        nn.Conv2d(2, 4, 3, padding=2, dilation=2, padding_mode="reflect"),
        (4, 2, 6, 6),
    ),
    "conv2d-same-replicate": (
        nn.Conv2d(2, 4, (2, 3), padding="same", padding_mode="replicate"),
        (4, 2, 5, 5),
    ),
    "conv2d-circular-groups": (
        nn.Conv2d(4, 6, 3, padding=1, groups=2, padding_mode="circular"),
        (4, 4, 5, 5),
    ),
    "conv2d-depthwise-valid": (nn.Conv2d(3, 3, 3, padding="valid", groups=3), (4, 3, 5, 5)),
    "conv2d-no-bias": (nn.Conv2d(2, 3, 3, stride=(2, 1), bias=False), (4, 2, 7, 6)),
    "conv3d": (nn.Conv3d(2, 3, 2, padding=(1, 0, 1)), (3, 2, 3, 4, 3)),
}


@pytest.mark.parametrize("name", list(CONVOLUTIONS))
def test_convolutions(ruled, name):
    torch.manual_seed(0)
    conv, shape = CONVOLUTIONS[name]
    model = nn.Sequential(conv, nn.Tanh(), nn.Flatten(), nn.LazyLinear(3)).to(F64)
    inputs = _randn(*shape)
    model(inputs)  # materialise the lazy layer
    model = _check(model, CE, inputs, _labels(shape[0], 3))
    (rule,) = [rule for module, rule in ruled if module is model[0]]
    assert rule.independent == [0]  # samples; the pixels feed one linear layer together
    assert rule.coupled == list(range(2, len(shape)))


def test_convolution_of_an_unbatched_image(ruled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Tanh(), nn.Flatten(0), nn.Linear(3 * 9, 2))
    _check(model, lambda out, t: (out - t).pow(2).sum(), _randn(2, 5, 5), _randn(2, seed=3))
    assert ruled[0][0] is model[0]


def test_train_mode_batch_norm_couples_the_samples(ruled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model = _check(model, CE, _randn(9, 5), _labels(9, 3))
    rules = {module: rule for module, rule in ruled}
    assert rules[model[0]].coupled == [0]
    assert rules[model[0]].count == 9 * 6
    assert rules[model[3]].coupled == [0]  # taken as coupled under batch statistics


class _Centred(nn.Module):
    """Samples coupled without BatchNorm: the batch mean is subtracted before the head."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = torch.tanh(self.inner(x))
        return self.head(h - h.mean(0))


def test_the_joint_check_finds_samples_coupled_without_batch_norm(ruled):
    torch.manual_seed(0)
    model = _check(_Centred(), CE, _randn(9, 5), _labels(9, 3))
    rules = {module: rule for module, rule in ruled}
    assert rules[model.inner].coupled == [0]  # reaches the other samples through the mean
    assert rules[model.head].coupled == [0]  # its blocks with the inner layer's reach them


def test_eval_mode_batch_norm_keeps_samples_independent(ruled):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))
    model.eval()
    _check(model, CE, _randn(9, 5), _labels(9, 3))
    assert all(rule.coupled == [] for _, rule in ruled)


class _Tied(nn.Module):
    """A language model whose decoder reuses the embedding's weight."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(7, 4)
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


def test_tied_weights_take_the_generic_path(ruled):
    torch.manual_seed(0)
    model = _check(_Tied(), CE, _tokens(), _labels(15, 7))
    assert [m for m, _ in ruled] == [model.inner]


def test_a_layer_called_twice_takes_the_generic_path(ruled):
    torch.manual_seed(0)
    model = _check(_Twice(), CE, _randn(6, 4), _labels(6, 3))
    assert [m for m, _ in ruled] == [model.head]


def test_an_output_changed_by_a_hook_takes_the_generic_path(ruled):
    model = _mlp()
    model[0].register_forward_hook(lambda module, args, out: out * 2)
    _check(model, CE, _randn(9, 5), _labels(9, 3))
    assert model[0] not in [m for m, _ in ruled]
    assert model[2] in [m for m, _ in ruled]


class _Penalised(nn.Module):
    """A weight that also enters the output directly (a penalty curving it)."""

    def __init__(self):
        super().__init__()
        self.layer = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.layer(x))) + (self.layer.weight**4).sum()


def test_a_weight_used_elsewhere_too_takes_the_generic_path(ruled):
    torch.manual_seed(0)
    model = _check(_Penalised(), CE, _randn(6, 4), _labels(6, 3))
    assert [m for m, _ in ruled] == [model.head]


def test_only_a_bias_selected(ruled):
    model = _mlp().to(F64)
    inputs, targets = _randn(9, 5), _labels(9, 3)
    full = _oracle(model, CE, inputs, targets)
    result = model_hessian_diagonal(model, CE, inputs, targets, params=["0.bias", "4.weight"])
    assert_close(result[0], full[1])
    assert_close(result[1], full[3])
    assert len(ruled) == 2


def test_products_of_a_tanh_mlp():
    # without forcing: each layer takes the rule, U products; log2(N) checks of the samples
    # cover all three layers at once
    model = _mlp().to(F64)
    inputs, targets = _randn(32, 5), _labels(32, 3)
    operator = HessianOperator.from_model(model, CE, (inputs, targets))
    diagonal = operator.diagonal()
    expected = _oracle(model, CE, inputs, targets)
    assert_close(diagonal, torch.cat([e.reshape(-1) for e in expected]))
    assert operator.num_matvecs == 5 + 6 + 4 + 3 < operator.shape[0]


def test_a_rule_that_would_cost_more_is_not_taken(monkeypatch):
    taken = []
    apply = _structure._apply
    monkeypatch.setattr(_structure, "_apply", lambda *args: taken.append(args[1]) or apply(*args))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(98, 3))
    model = _check(model, CE, _randn(4, 1, 7, 7), _labels(4, 3))
    assert [layer.module for layer in taken] == [model[3]]  # 49 pixels x 2 > 20 elements


def test_closure_and_create_graph_take_the_generic_path(ruled):
    model = _mlp().to(F64)
    inputs, targets = _randn(9, 5), _labels(9, 3)
    expected = _oracle(model, CE, inputs, targets)
    params = list(model.parameters())
    for r, e in zip(hessian_diagonal(lambda: CE(model(inputs), targets), params), expected):
        assert_close(r, e)
    for r, e in zip(model_hessian_diagonal(model, CE, inputs, targets, True), expected):
        assert_close(r.detach(), e)
    assert ruled == []


def test_structured_diagonal_is_reproducible():
    model = _mlp().to(F64)
    inputs, targets = _randn(9, 5), _labels(9, 3)
    first = model_hessian_diagonal(model, CE, inputs, targets)
    second = model_hessian_diagonal(model, CE, inputs, targets)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ----------------------------------------------------------------------------- Gauss-Newton rule


@pytest.fixture
def factored(monkeypatch):
    """Record the layers that take the Gauss-Newton rule."""
    taken = []
    rule = _structure._gauss_newton_diagonals

    def spy(graph, output, out_index, layers, chunk_size):
        taken.extend(layer.module for layer in layers.values())
        return rule(graph, output, out_index, layers, chunk_size)

    monkeypatch.setattr(_structure, "_gauss_newton_diagonals", spy)
    return taken


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
    return model.eval()


def test_a_piecewise_linear_network_takes_the_gauss_newton_rule(factored):
    inputs, targets = _randn(6, 2, 6, 6), _labels(6, 3)
    model = _check(_relu_net(), CE, inputs, targets)
    assert set(factored) == {model.stem, model.norm, model.conv, model.head}
    operator = HessianOperator.from_model(model, CE, (inputs, targets))
    with operator:
        operator.diagonal()
    # 3 output products and 3 backward passes, 3 + 3 checks over 6 samples (3 bits)
    assert operator.num_matvecs == 2 * (3 + 3) < operator.shape[0]


def test_the_gauss_newton_rule_with_an_output_per_token(factored):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    model = _check(model, nn.MSELoss(), _randn(5, 3, 4), _randn(5, 3, 2, seed=2))
    assert set(factored) == {model[0], model[2]}  # six outputs per sample: 3 tokens x 2


def test_nonlinear_paths_keep_the_layer_rules(factored):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 40), nn.Tanh(), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3)
    )
    model = _check(model, CE, _randn(8, 5), _labels(8, 3))
    assert set(factored) == {model[2], model[4]}  # the first layer's path has a tanh


class _Gated(nn.Module):
    """A gate multiplying two functions of the same layer's output: not piecewise linear."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = self.inner(x)
        return self.head(h * F.relu(h))


def test_a_product_of_two_paths_keeps_the_layer_rules(factored):
    torch.manual_seed(0)
    model = _check(_Gated(), CE, _randn(8, 5), _labels(8, 3))
    assert model.inner not in factored


def test_train_mode_batch_norm_keeps_the_layer_rules(factored):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), nn.BatchNorm1d(40), nn.ReLU(), nn.Linear(40, 3))
    model = _check(model, CE, _randn(8, 5), _labels(8, 3))
    assert model[0] not in factored
    assert model[1] not in factored


class _Mixed(nn.Module):
    """Piecewise linear, but each output sees every sample (the batch mean is subtracted)."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(5, 40)
        self.head = nn.Linear(40, 3)

    def forward(self, x):
        h = F.relu(self.inner(x))
        return self.head(h - h.mean(0))


def test_samples_mixed_before_the_output_keep_the_layer_rules(factored):
    torch.manual_seed(0)
    model = _check(_Mixed(), CE, _randn(8, 5), _labels(8, 3))
    assert model.inner not in factored  # its Jacobian reaches the other samples


def test_a_loss_coupling_the_samples_keeps_the_layer_rules(factored):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 40), nn.ReLU(), nn.Linear(40, 3))

    def coupled(outputs, targets):
        return outputs.sum(0).square().sum() + CE(outputs, targets)

    _check(model, coupled, _randn(8, 5), _labels(8, 3))
    assert factored == []  # the loss's Hessian reaches across samples


def test_the_gauss_newton_rule_is_reproducible_and_leaves_no_trace():
    model = _relu_net().to(F64)
    inputs, targets = _randn(6, 2, 6, 6), _labels(6, 3)
    first = model_hessian_diagonal(model, CE, inputs, targets)
    second = model_hessian_diagonal(model, CE, inputs, targets)
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    assert model._forward_hooks == {}
    assert model.stem._forward_hooks == {}


def test_outputs_too_large_per_sample_keep_the_layer_rules(factored, monkeypatch):
    monkeypatch.setattr(_structure, "OUTPUT_BLOCK_BYTES", 6 * 3 * 3 * 8 - 1)
    inputs, targets = _randn(6, 2, 6, 6), _labels(6, 3)
    _check(_relu_net(), CE, inputs, targets)
    assert factored == []


def test_train_mode_dropout_takes_the_gauss_newton_rule(factored):
    # the mask multiplies the activations: linear, so the rule holds for the masks drawn
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(5, 40), nn.ReLU(), nn.Dropout(0.5), nn.Linear(40, 40), nn.ReLU(), nn.Linear(40, 3)
    ).to(F64)
    inputs, targets = _randn(8, 5), _labels(8, 3)

    def seeded():  # the masks of seed 0, which the model forms draw for their one batch
        with torch.random.fork_rng():
            torch.manual_seed(0)
            return CE(model(inputs), targets)

    expected = hessian_diagonal(seeded, list(model.parameters()))
    for r, e in zip(model_hessian_diagonal(model, CE, inputs, targets), expected):
        assert_close(r, e)
    assert set(factored) == {model[0], model[3], model[5]}
