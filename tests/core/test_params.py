"""select_params, flatten and unflatten."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from tests.cases import CASES, build, case_by_id
from torch_secorder import flatten, select_params, unflatten
from torch_secorder.core.params import module_tree


def _model():
    return nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))


# ----------------------------------------------------------------------------- select_params


@pytest.mark.parametrize(
    ("selection", "expected"),
    [
        (None, ["0.weight", "0.bias", "2.weight", "2.bias"]),
        ("2.bias", ["2.bias"]),
        ("*.weight", ["0.weight", "2.weight"]),
        ("0.*", ["0.weight", "0.bias"]),
        (["2.*", "0.bias"], ["0.bias", "2.weight", "2.bias"]),  # model order, not request order
        (("*.bias", "2.bias"), ["0.bias", "2.bias"]),  # overlapping entries select once
        ((name for name in ["2.bias", "0.weight"]), ["0.weight", "2.bias"]),  # any iterable
        ("*", ["0.weight", "0.bias", "2.weight", "2.bias"]),
    ],
)
def test_select_params(selection, expected):
    model = _model()
    selected = select_params(model, selection)
    assert list(selected) == expected
    named = dict(model.named_parameters())
    assert all(selected[name] is named[name] for name in expected)


def test_select_params_default_skips_frozen_explicit_keeps_it():
    built = build(case_by_id("frozen"))
    assert "0.bias" not in select_params(built.model)
    selected = select_params(built.model, "0.*")
    assert list(selected) == ["0.weight", "0.bias"]
    assert not selected["0.bias"].requires_grad


def test_select_params_shared_parameter_appears_once_under_its_first_name():
    built = build(case_by_id("tied-embedding"))
    assert list(select_params(built.model)) == ["embed.weight"]
    with pytest.raises(
        ValueError, match=r"entry 'out\.weight' names 'out\.weight', a parameter shared"
    ):
        select_params(built.model, "out.weight")


class _Reused(nn.Module):
    """A submodule under two names, a parameter in two modules, an unset parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Linear(2, 2), nn.Tanh())
        self.b = nn.Sequential(self.a[0], nn.Linear(2, 2))
        self.b[1].weight = self.a[0].weight
        self.register_parameter("unset", None)
        self.add_module("empty", None)
        self.scale = nn.Parameter(torch.ones(()))


class _OwnNamedModules(nn.Sequential):
    def named_modules(self, *args, **kwargs):  # (a container listing its children its way)
        yield from reversed(list(super().named_modules(*args, **kwargs)))


@pytest.mark.parametrize(
    "model",
    [
        *(pytest.param(lambda case=case: build(case).model, id=case.id) for case in CASES),
        pytest.param(_Reused, id="reused"),
        pytest.param(
            lambda: nn.Sequential(nn.Linear(2, 2), _OwnNamedModules(nn.Linear(2, 2), nn.Tanh())),
            id="own",
        ),
    ],
)
def test_module_tree_and_selection_follow_named_modules_and_parameters(model):
    model = model()
    tree = module_tree(model)
    assert [(name, id(m)) for name, m in tree] == [
        (name, id(m)) for name, m in model.named_modules()
    ]
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    selected = select_params(model)
    assert list(selected) == list(named)
    assert all(selected[name] is p for name, p in named.items())


@pytest.mark.parametrize(
    ("selection", "error", "match"),
    [
        (
            "nope*",
            ValueError,
            r"^select_params: params entry 'nope\*' matches no parameter of the model; "
            r"its parameters are: 0\.weight, 0\.bias, 2\.weight, 2\.bias\.$",
        ),
        (
            ["0.weight", "nope"],
            ValueError,
            r"^select_params: params entry 'nope' matches no parameter",
        ),
        ([], ValueError, r"^select_params: params is an empty list; expected names or patterns\.$"),
        (
            3,
            TypeError,
            r"^select_params: params must be None, a name or glob pattern, or a list of them; "
            r"got int\.$",
        ),
        (
            (torch.zeros(1) for _ in range(1)),  # tensors, not names (model.parameters())
            TypeError,
            r"^select_params: params\[0\] must be a name or glob pattern \(str\); got Tensor\.$",
        ),
        (torch.zeros(2), TypeError, r"^select_params: params must be None, .* got Tensor\.$"),
        (
            ["0.weight", 3],
            TypeError,
            r"^select_params: params\[1\] must be a name or glob pattern \(str\); got int\.$",
        ),
    ],
)
def test_select_params_errors(selection, error, match):
    with pytest.raises(error, match=match):
        select_params(_model(), selection)


def test_select_params_lists_at_most_eight_names():
    model = nn.Sequential(*[nn.Linear(1, 1) for _ in range(5)])
    with pytest.raises(ValueError, match=r"are: 0\.weight, 0\.bias, .*, 3\.bias, \.\.\.\.$"):
        select_params(model, "x")


def test_select_params_errors_on_models():
    with pytest.raises(TypeError, match=r"^select_params: model must be a torch\.nn\.Module; got"):
        select_params([torch.zeros(1)])
    model = _model().requires_grad_(False)
    with pytest.raises(
        ValueError, match=r"^select_params: the model has no parameters with requires_grad=True"
    ):
        select_params(model)
    assert list(select_params(model, "2.bias")) == ["2.bias"]


# ----------------------------------------------------------------------------- flatten / unflatten


def _tensors(generator, lead=()):
    shapes = [(2, 3), (), (4,), (1, 2, 2)]
    return [torch.randn((*lead, *s), generator=generator, dtype=torch.float64) for s in shapes]


def test_flatten_matches_parameters_to_vector(case):
    expected = nn.utils.parameters_to_vector(case.params)
    assert_close(flatten(case.params), expected, rtol=0, atol=0)


def test_flat_round_trip():
    tensors = _tensors(torch.Generator().manual_seed(0))
    flat = flatten(tensors)
    assert flat.shape == (6 + 1 + 4 + 4,)
    back = unflatten(flat, tensors)
    assert type(back) is list
    for b, t in zip(back, tensors):
        assert b.shape == t.shape
        assert_close(b, t, rtol=0, atol=0)
    assert_close(flatten(back), flat, rtol=0, atol=0)


def test_batched_round_trip():
    g = torch.Generator().manual_seed(1)
    params = _tensors(g)
    stacks = _tensors(g, lead=(3,))
    flat = flatten(stacks, batched=True)
    assert flat.shape == (3, 15)
    for j in range(3):
        assert_close(flat[j], flatten([s[j] for s in stacks]), rtol=0, atol=0)
    back = unflatten(flat, params)
    for b, s in zip(back, stacks):
        assert_close(b, s, rtol=0, atol=0)


def test_batched_flatten_of_no_vectors():
    params = _tensors(torch.Generator().manual_seed(2))
    empty = [p.new_zeros(0, *p.shape) for p in params]
    assert flatten(empty, batched=True).shape == (0, 15)
    assert [t.shape for t in unflatten(torch.zeros(0, 15), params)] == [
        (0, *p.shape) for p in params
    ]


def test_one_parameter_round_trip_stays_a_list():
    p = torch.arange(6.0).reshape(2, 3)
    (back,) = unflatten(flatten([p]), [p])
    assert_close(back, p, rtol=0, atol=0)
    assert type(unflatten(torch.zeros(6), (p,))) is list


def test_unflatten_returns_views():
    params = _tensors(torch.Generator().manual_seed(3))
    flat = torch.zeros(15, dtype=torch.float64)
    unflatten(flat, params)[2].fill_(1.0)
    assert flat.tolist() == [0.0] * 7 + [1.0] * 4 + [0.0] * 4


def test_flatten_accepts_any_iterable_of_tensors():
    model = nn.Sequential(nn.Linear(3, 2), nn.Tanh(), nn.Linear(2, 1))
    expected = torch.nn.utils.parameters_to_vector(model.parameters())
    assert torch.equal(flatten(model.parameters()), expected)
    assert torch.equal(flatten(tuple(model.parameters())), expected)


def test_unflatten_accepts_any_iterable_of_params():
    params = _tensors(torch.Generator().manual_seed(4))
    flat = flatten(params)
    for b, t in zip(unflatten(flat, (p for p in params)), params):
        assert_close(b, t, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((torch.zeros(3),), {}, TypeError, r"^flatten: tensors must be an iterable of tensors"),
        (([],), {}, ValueError, r"^flatten: tensors is empty; expected at least one tensor\.$"),
        (
            ([torch.zeros(2), 1.0],),
            {},
            TypeError,
            r"^flatten: tensors\[1\] must be a Tensor; got float\.$",
        ),
        (
            ([torch.zeros(2, 3), torch.zeros(3, 1)],),
            {"batched": True},
            ValueError,
            r"^flatten: tensors\[1\] has shape \(3, 1\) but tensors\[0\] has shape \(2, 3\); "
            r"with batched=True every tensor needs the same leading dimension k\.$",
        ),
        (
            ([torch.zeros(2), torch.zeros(())],),
            {"batched": True},
            ValueError,
            r"^flatten: tensors\[1\] is 0-d; with batched=True every tensor needs a leading "
            r"dimension k",
        ),
        (
            ([torch.zeros(()), torch.zeros(2)],),
            {"batched": True},
            ValueError,
            r"^flatten: tensors\[0\] is 0-d",
        ),
    ],
)
def test_flatten_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        flatten(*args, **kwargs)


@pytest.mark.parametrize(
    ("vector", "params", "error", "match"),
    [
        ([0.0, 1.0], [torch.zeros(2)], TypeError, r"^unflatten: vector must be a Tensor; got list"),
        (
            torch.zeros(5),
            [torch.zeros(2)],
            ValueError,
            r"^unflatten: vector has shape \(5,\); expected \(2,\) or \(k, 2\) for params with 2 "
            r"elements in total\.$",
        ),
        (torch.zeros(2, 2, 2), [torch.zeros(2)], ValueError, r"^unflatten: vector has shape"),
        (torch.zeros(()), [torch.zeros(1)], ValueError, r"^unflatten: vector has shape \(\)"),
        (torch.zeros(2), torch.zeros(2), TypeError, r"^unflatten: params must be an iterable"),
        (torch.zeros(2), [], ValueError, r"^unflatten: params is empty"),
    ],
)
def test_unflatten_errors(vector, params, error, match):
    with pytest.raises(error, match=match):
        unflatten(vector, params)


class _TiedLanguageModel(torch.nn.Module):
    """A decoder sharing the embedding's weight, registered under both names (as GPT-2)."""

    def __init__(self):
        super().__init__()
        self.wte = torch.nn.Embedding(10, 4)
        self.lm_head = torch.nn.Linear(4, 10, bias=False)
        self.lm_head.weight = self.wte.weight

    def forward(self, tokens):
        return self.lm_head(self.wte(tokens))


def test_the_second_name_of_a_tied_parameter_says_so():
    model = _TiedLanguageModel()
    with pytest.raises(
        ValueError,
        match=r"^select_params: params entry 'lm_head.weight' names 'lm_head.weight', a parameter "
        r"shared with 'wte.weight' \(tied weights\), which is selected under its first name; "
        r"pass 'wte.weight'\.$",
    ):
        select_params(model, "lm_head.weight")
    assert list(select_params(model, "*.weight")) == ["wte.weight"]
