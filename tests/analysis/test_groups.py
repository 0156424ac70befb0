import warnings
import weakref

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import torch_secorder as ts
from tests.analysis.operators import DTYPE, tanh_mlp
from torch_secorder.analysis import _lanczos, _memory
from torch_secorder.analysis._groups import resolve_groups, rows_of
from torch_secorder.core._model import model_params


class Nested(nn.Module):
    """A root-owned parameter, a nested block, a shared layer and a frozen one."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(2, dtype=DTYPE))
        self.body = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 2)).to(DTYPE)
        self.shared = self.body[0]
        self.frozen = nn.Linear(2, 2).to(DTYPE)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.body(x * self.scale))


def groups_of(model, groups, params=None):
    names, tensors = model_params("test", model, params)
    resolved = resolve_groups("test", model, names, tensors, groups)
    return None if resolved is None else {k: [names[i] for i in v] for k, v in resolved.items()}


def test_module_groups_follow_named_modules():
    assert groups_of(Nested(), "module") == {
        "": ["scale"],
        "body.0": ["body.0.weight", "body.0.bias"],
        "body.2": ["body.2.weight", "body.2.bias"],
    }


def test_root_group_is_named_and_reported():
    model = Nested()
    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=DTYPE)
    traces = ts.model_hessian_trace(model, nn.MSELoss(), (x, x), groups="module", method="exact")
    assert list(traces) == ["", "body.0", "body.2"]  # the names of named_modules
    exact = ts.model_hessian_diagonal(model, nn.MSELoss(), x, x)
    torch.testing.assert_close(traces[""].value, exact[0].sum())


class SharedWeight(nn.Module):
    """Two linear layers holding the same weight parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3).to(DTYPE)
        self.second = nn.Linear(3, 3).to(DTYPE)
        self.second.weight = self.first.weight

    def forward(self, x):
        return self.second(torch.tanh(self.first(x)))


def test_tied_parameters_count_once_under_their_first_name():
    model = SharedWeight()
    assert groups_of(model, "module") == {
        "first": ["first.weight", "first.bias"],
        "second": ["second.bias"],
    }
    assert list(groups_of(model, "parameter")) == ["first.weight", "first.bias", "second.bias"]
    with pytest.raises(
        ValueError,
        match=r"test: groups\['b'\] entry 'second\.weight' matches no selected parameter; "
        r"'second\.weight' is a parameter shared with 'first\.weight', the name it is selected "
        r"and grouped under; the selected parameters are: first\.weight, first\.bias, "
        r"second\.bias\.",
    ):
        groups_of(model, {"b": "second.weight"})


def test_module_groups_within_a_selection():
    model = Nested()
    assert groups_of(model, "module", params="*.weight") == {  # explicit: frozen too
        "body.0": ["body.0.weight"],
        "body.2": ["body.2.weight"],
        "frozen": ["frozen.weight"],
    }
    assert groups_of(model, "module", params=["frozen.*"]) == {
        "frozen": ["frozen.weight", "frozen.bias"]
    }


def test_parameter_and_dict_groups():
    model = Nested()
    assert list(groups_of(model, "parameter")) == [
        "scale",
        "body.0.weight",
        "body.0.bias",
        "body.2.weight",
        "body.2.bias",
    ]
    assert groups_of(model, {"weights": "*.weight", "mixed": ["scale", "body.2.*"]}) == {
        "weights": ["body.0.weight", "body.2.weight"],
        "mixed": ["scale", "body.2.weight", "body.2.bias"],
    }
    assert groups_of(model, None) is None


def test_rows_are_slices_when_contiguous():
    sizes = [2, 6, 3, 6, 2]
    assert rows_of([1, 2], sizes, torch.device("cpu")) == slice(2, 11)
    rows = rows_of([0, 3], sizes, torch.device("cpu"))
    assert torch.equal(rows, torch.tensor([0, 1, 11, 12, 13, 14, 15, 16]))


@pytest.mark.parametrize(
    ("groups", "error", "match"),
    [
        (
            "layer",
            ValueError,
            r"test: groups must be None, 'module', 'parameter' or a dict of name -> parameter "
            r"names "
            r"or patterns; got 'layer'\.",
        ),
        (
            ["body.*"],
            TypeError,
            r"test: groups must be None, 'module', 'parameter' or a dict .*; "
            r"got list\.",
        ),
        ({}, ValueError, r"test: groups is an empty dict; expected at least one group\."),
        ({1: "scale"}, TypeError, r"test: groups keys must be str; got int\."),
        (
            {"a": 3},
            TypeError,
            r"test: groups\['a'\] must be a parameter name or pattern or a list "
            r"of them; got int\.",
        ),
        ({"a": []}, ValueError, r"test: groups\['a'\] is empty; expected names or patterns\."),
        (
            {"a": ["scale", "head.*"]},
            ValueError,
            r"test: groups\['a'\] entry 'head\.\*' matches no selected parameter; the selected "
            r"parameters are: scale, body\.0\.weight, body\.0\.bias, body\.2\.weight, "
            r"body\.2\.bias\.",
        ),
        (
            {"a": "frozen.weight"},
            ValueError,
            r"entry 'frozen\.weight' matches no selected parameter",
        ),
    ],
)
def test_bad_groups(groups, error, match):
    with pytest.raises(error, match=match):
        groups_of(Nested(), groups)


def test_operator_spans_only_the_grouped_parameters():
    model, loss_fn, inputs, targets = tanh_mlp()
    named = dict(model.named_parameters())
    exact = ts.model_hessian_diagonal(model, loss_fn, inputs, targets)
    results = ts.model_hessian_trace(
        model,
        loss_fn,
        (inputs, targets),
        groups={"outer": ["0.weight", "4.bias"]},
        method="exact",
    )
    result = results["outer"]
    assert 0 < result.num_matvecs <= named["0.weight"].numel() + named["4.bias"].numel()
    torch.testing.assert_close(result.value, exact[0].sum() + exact[5].sum())


def test_each_group_draws_from_its_own_generator():
    model, loss_fn, inputs, targets = tanh_mlp()
    data = (inputs, targets)
    one = ts.model_hessian_trace(model, loss_fn, data, groups={"a": "0.*"}, method="hutchinson")
    two = ts.model_hessian_trace(
        model, loss_fn, data, groups={"a": "0.*", "b": "2.*"}, method="hutchinson"
    )
    torch.testing.assert_close(one["a"].value, two["a"].value)
    seeded = ts.model_hessian_trace(
        model,
        loss_fn,
        data,
        groups={"a": "0.*"},
        method="hutchinson",
        generator=torch.Generator().manual_seed(4),
    )
    assert float(seeded["a"].value) != float(one["a"].value)


def test_whole_model_form_equals_the_operator_form():
    model, loss_fn, inputs, targets = tanh_mlp()
    data = [(inputs[:5], targets[:5]), (inputs[5:], targets[5:])]
    by_model = ts.model_hessian_trace(model, loss_fn, data, params="*.weight")
    operator = ts.HessianOperator.from_model(model, loss_fn, data, params="*.weight")
    by_operator = ts.hessian_trace(operator)
    torch.testing.assert_close(by_model.value, by_operator.value)
    assert by_model.num_matvecs == by_operator.num_matvecs == operator.num_matvecs


def test_model_errors_come_before_any_forward_pass():
    model, loss_fn, inputs, targets = tanh_mlp()
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=r"model_top_eigenvalues: params entry 'head\.\*' "):
        ts.model_top_eigenvalues(model, loss_fn, (inputs, targets), params="head.*")
    with pytest.raises(
        TypeError,
        match=r"model_spectral_density: model must be a "
        r"torch\.nn\.Module; got str\.",
    ):
        ts.model_spectral_density("model", loss_fn, (inputs, targets))
    with pytest.raises(ValueError, match=r"model_hessian_trace: data is empty"):
        ts.model_hessian_trace(model, loss_fn, [], groups="module")
    assert calls == []


class PeakMemory(TorchDispatchMode):
    """Track the bytes of live tensor storages created by operators; keep the peak.

    Every operator's output storage is counted from its creation until it is freed (a
    finalizer on the storage), so the figure is the largest total of tensor memory alive at
    once, deterministic for a deterministic computation (unlike resident memory).
    """

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if storage.nbytes() == 0 or key in self.live:
                continue
            self.live[key] = storage.nbytes()
            self.current += storage.nbytes()
            self.peak = max(self.peak, self.current)
            weakref.finalize(storage, self._free, key)
        return out

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key)


def deep_mlp(layers: int = 12, width: int = 16):
    g = torch.Generator().manual_seed(0)
    modules: list[nn.Module] = []
    for _ in range(layers):
        modules += [nn.Linear(width, width), nn.Tanh()]
    model = nn.Sequential(*modules[:-1]).to(DTYPE)
    data = [
        (
            torch.randn(8, width, generator=g, dtype=DTYPE),
            torch.randn(8, width, generator=g, dtype=DTYPE),
        )
        for _ in range(2)
    ]
    return model, data


ANALYSES = {
    "hutch++": lambda m, d, g: ts.model_hessian_trace(
        m, nn.MSELoss(), d, groups=g, method="hutch++", num_matvecs=30
    ),
    "hutchinson": lambda m, d, g: ts.model_hessian_trace(
        m, nn.MSELoss(), d, groups=g, method="hutchinson", num_matvecs=40
    ),
    "lanczos": lambda m, d, g: ts.model_top_eigenvalues(
        m, nn.MSELoss(), d, groups=g, max_matvecs=40
    ),
    "density": lambda m, d, g: ts.model_spectral_density(
        m, nn.MSELoss(), d, groups=g, num_probes=2, num_matvecs=24
    ),
}


@pytest.mark.parametrize("analysis", list(ANALYSES))
def test_per_module_memory_stays_within_twice_the_whole_model(analysis, monkeypatch):
    # 12 modules of 272 parameters; chunks of at most 8 full-length columns (the 1 GiB rule of
    # a large model, scaled down), so the chunk is of the size of a whole-model analysis.
    model, data = deep_mlp()
    size = sum(p.numel() for p in model.parameters())
    monkeypatch.setattr(_memory, "BLOCK_BYTES", 8 * size * 8)
    monkeypatch.setattr(_lanczos, "BASIS_BYTES", 12 * size * 8)  # one density probe at a time
    widths = []
    matmat = ts.HessianOperator.matmat

    def recording(self, V, **kwargs):
        widths.append(V.shape[1])
        return matmat(self, V, **kwargs)

    monkeypatch.setattr(ts.HessianOperator, "matmat", recording)
    peaks = {}
    for groups in (None, "module"):
        widths.clear()
        with PeakMemory() as memory, warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a budget left unconverged is fine
            results = ANALYSES[analysis](model, data, groups)
        peaks[groups] = memory.peak
        assert max(widths) <= 8  # no block of all groups' columns at full length
        if groups == "module":
            assert len(results) == 12
            # the count stays exact: every column handed to matmat belongs to one group
            assert sum(widths) == sum(r.num_matvecs for r in results.values())
    # the unchunked driver took 10x (Hutchinson, Hutch++), 2.6x (density) and 1.7x (Lanczos)
    assert peaks["module"] <= 2 * peaks[None], peaks


def test_a_block_of_rounding_noise_is_a_zero_block():
    # a bias before a BatchNorm in training mode: the loss does not depend on it, its block
    # is rounding noise (asymmetric relative to itself), zero beside the other groups: no
    # asymmetry error, and its eigenvalue converges as zero (no warning)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
    model = model.to(DTYPE).train()
    g = torch.Generator().manual_seed(0)
    data = (torch.randn(10, 4, generator=g, dtype=DTYPE), torch.randint(0, 2, (10,), generator=g))
    loss_fn = nn.CrossEntropyLoss()
    density = ts.model_spectral_density(model, loss_fn, data, groups="parameter")
    top = ts.model_top_eigenvalues(model, loss_fn, data, groups="parameter")
    assert all(result.converged for result in top.values())
    largest = max(float(r.eigenvalues.abs().max()) for r in top.values())
    assert largest > 0.1
    assert float(top["0.bias"].eigenvalues.abs().max()) < 1e-12 * largest
    assert float(density["0.bias"].nodes.abs().max()) < 1e-12 * largest
