"""The model forms over activations and inputs: groups, samples, exact and estimated results."""

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torch_secorder as ts
from tests import reference as ref
from tests.core.helpers import Recorder, assert_unchanged, snapshot
from tests.real.helpers import assert_identical

DTYPE = torch.float64
CE = nn.CrossEntropyLoss()


def make_mlp(dropout=0.0):
    torch.manual_seed(0)
    layers = [nn.Linear(3, 5), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers += [nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)]
    return nn.Sequential(*layers).to(DTYPE)


def make_bn(mode="train"):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Tanh(), nn.Linear(4, 3))
    return model.to(DTYPE).train(mode == "train")


def batches_of(sizes, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, 3, generator=g, dtype=DTYPE), torch.randint(0, 3, (n,), generator=g))
        for n in sizes
    ]


SIZES = (3, 1, 2)
MODULES = ["1", "3"]


def oracle(model, batches, modules=None):
    return ref.variable_hessian(model, CE, batches, modules)


def rows_of_module(batches, sizes_per_sample, which):
    """Flat rows of variable ``which`` in every batch (variables of per-sample sizes)."""
    rows, offset = [], 0
    for x, _ in batches:
        n = x.shape[0]
        for v, q in enumerate(sizes_per_sample):
            if v == which:
                rows.extend(range(offset, offset + n * q))
            offset += n * q
    return rows


def sample_rows(batches, sizes_per_sample):
    """Per sample (data order), its flat rows."""
    out, offset = [], 0
    for x, _ in batches:
        n = x.shape[0]
        starts = []
        for q in sizes_per_sample:
            starts.append(offset)
            offset += n * q
        for i in range(n):
            out.append([s + i * q + j for s, q in zip(starts, sizes_per_sample) for j in range(q)])
    return out


# ----------------------------------------------------------------------------- trace


@pytest.mark.parametrize("method", ["auto", "exact"])
def test_exact_traces_of_the_whole_each_module_and_each_sample(method):
    model, batches = make_mlp(), batches_of(SIZES)
    H = oracle(model, batches, MODULES)
    whole = ts.model_hessian_trace(
        model, CE, batches, wrt="activations", modules=MODULES, method=method
    )
    assert whole.method == "exact"
    assert_close(whole.value, H.trace())
    per_module = ts.model_hessian_trace(
        model, CE, batches, wrt="activations", modules=MODULES, groups="module", method=method
    )
    assert list(per_module) == MODULES
    for v, name in enumerate(MODULES):
        rows = rows_of_module(batches, [5, 4], v)
        assert_close(per_module[name].value, H[rows][:, rows].trace())
    per_sample = ts.model_hessian_trace(
        model, CE, batches, wrt="activations", modules=MODULES, groups="sample", method=method
    )
    assert list(per_sample) == list(range(6))
    for i, rows in enumerate(sample_rows(batches, [5, 4])):  # N H: the sample's own loss
        assert_close(per_sample[i].value, 6 * H[rows][:, rows].trace())


@pytest.mark.parametrize("method", ["hutchinson", "hutch++", "xtrace"])
def test_estimators_are_unbiased_within_their_errors(method):
    model, batches = make_mlp(), batches_of(SIZES)
    exact = oracle(model, batches).trace()
    values = []
    for seed in range(8):
        est = ts.model_hessian_trace(
            model,
            CE,
            batches,
            wrt="inputs",
            method=method,
            num_matvecs=12,
            generator=torch.Generator().manual_seed(seed),
        )
        assert est.method == method
        assert est.num_matvecs <= 12
        values.append(est.value)
    # the mean of 8 independent estimates, within 4 of its standard errors
    values = torch.stack(values)
    assert abs(float(values.mean() - exact)) <= 4 * float(values.std()) / 8**0.5


def test_auto_estimates_where_the_diagonal_costs_more():
    model, batches = make_mlp(), batches_of(SIZES)
    est = ts.model_hessian_trace(
        model, CE, batches, wrt="activations", modules=MODULES, num_matvecs=4
    )
    assert est.method == "hutch++"
    per_module = ts.model_hessian_trace(
        model, CE, batches, wrt="activations", modules=MODULES, groups="module", num_matvecs=7
    )
    # "3" (4 entries per sample, plus count(3) = 3 checks) fits 7 products, "1" (5 + 3) not
    assert per_module["3"].method == "exact"
    assert per_module["1"].method == "hutch++"
    assert all(r.num_matvecs <= 7 for r in per_module.values())
    # at 5, "3" alone would fit if the checks were charged to "1": they are its own
    tight = ts.model_hessian_trace(
        model, CE, batches, wrt="activations", modules=MODULES, groups="module", num_matvecs=5
    )
    assert [r.method for r in tight.values()] == ["hutch++", "hutch++"]
    assert all(r.num_matvecs <= 5 for r in tight.values())
    H = oracle(model, batches, MODULES)
    rows = rows_of_module(batches, [5, 4], 1)
    assert_close(per_module["3"].value, H[rows][:, rows].trace())


def test_dict_groups_take_modules_by_name_or_pattern():
    model, batches = make_mlp(), batches_of(SIZES)
    modules = ["1", "3", "4"]
    result = ts.model_hessian_trace(
        model,
        CE,
        batches,
        wrt="activations",
        modules=modules,
        groups={"hidden": "[13]", "out": ["4"]},
    )
    H = oracle(model, batches, modules)
    hidden = sorted(rows_of_module(batches, [5, 4, 3], 0) + rows_of_module(batches, [5, 4, 3], 1))
    assert_close(result["hidden"].value, H[hidden][:, hidden].trace())
    out = rows_of_module(batches, [5, 4, 3], 2)
    assert_close(result["out"].value, H[out][:, out].trace())


# ----------------------------------------------------------------------------- eigenvalues


@pytest.mark.parametrize("model_kind", ["independent", "batchnorm"])
def test_top_eigenvalue_of_each_sample(model_kind):
    model = make_mlp() if model_kind == "independent" else make_bn("train")
    batches = batches_of(SIZES if model_kind == "independent" else (3, 2, 2))
    H = oracle(model, batches)
    result = ts.model_top_eigenvalues(model, CE, batches, wrt="inputs", groups="sample", k=2)
    total = sum(x.shape[0] for x, _ in batches)
    assert list(result) == list(range(total))
    for i, rows in enumerate(sample_rows(batches, [3])):
        block = total * H[rows][:, rows]
        assert_close(result[i].eigenvalues, torch.linalg.eigvalsh(block).flip(0)[:2])
        vectors = result[i].eigenvectors
        assert isinstance(vectors, list)
        assert vectors[0].shape == (2, 3)
        assert_close(block @ vectors[0].T, vectors[0].T * result[i].eigenvalues)


def test_the_samples_of_one_data_set_advance_together(monkeypatch):
    # Independent samples share every product: one column carries a vector of every sample.
    columns = []
    matmat = ts.HessianOperator.matmat

    def counted(self, V, **kwargs):
        columns.append(V.shape[1])
        return matmat(self, V, **kwargs)

    monkeypatch.setattr(ts.HessianOperator, "matmat", counted)
    batches = batches_of((4, 4))
    result = ts.model_top_eigenvalues(make_mlp(), CE, batches, wrt="inputs", groups="sample")
    assert sum(columns) == max(r.num_matvecs for r in result.values())
    # with batch statistics, one sample per batch shares a column: 4 at a time
    columns.clear()
    result = ts.model_top_eigenvalues(make_bn("train"), CE, batches, wrt="inputs", groups="sample")
    assert sum(columns) == sum(r.num_matvecs for r in result.values()) // 2


def test_top_eigenvalues_of_the_whole_and_per_module():
    model, batches = make_mlp(), batches_of(SIZES)
    H = oracle(model, batches, MODULES)
    whole = ts.model_top_eigenvalues(model, CE, batches, wrt="activations", modules=MODULES, k=2)
    assert_close(whole.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:2], rtol=1e-6, atol=1e-8)
    assert [v.shape for v in whole.eigenvectors] == [(2, n, q) for n in SIZES for q in (5, 4)]
    per_module = ts.model_top_eigenvalues(
        model, CE, batches, wrt="activations", modules=MODULES, groups="module"
    )
    for v, name in enumerate(MODULES):
        rows = rows_of_module(batches, [5, 4], v)
        expected = torch.linalg.eigvalsh(H[rows][:, rows])[-1:]
        assert_close(per_module[name].eigenvalues, expected, rtol=1e-6, atol=1e-8)
        assert [t.shape for t in per_module[name].eigenvectors] == [
            (1, n, (5, 4)[v]) for n in SIZES
        ]


def test_sharpness_of_the_input_hessian():
    model, batches = make_mlp(), batches_of(SIZES)
    H = oracle(model, batches)
    result = ts.model_sharpness(model, CE, batches, wrt="inputs")
    largest = torch.linalg.eigvalsh(H).abs().max()
    assert_close(result.eigenvalues.abs()[0], largest, rtol=1e-6, atol=1e-8)


# ----------------------------------------------------------------------------- density, diagonal


def test_density_nodes_are_the_eigenvalues_when_the_basis_spans():
    # distinct eigenvalues (a repeated one ends the Krylov space early)
    model, batches = make_mlp(), batches_of((2,))
    H = oracle(model, batches)
    result = ts.model_spectral_density(
        model, CE, batches[0], wrt="inputs", num_probes=1, num_matvecs=6
    )
    assert_close(result.nodes[0], torch.linalg.eigvalsh(H), rtol=1e-6, atol=1e-10)
    H = oracle(model, batches, ["1"])
    per_sample = ts.model_spectral_density(
        model,
        CE,
        batches[0],
        wrt="activations",
        modules="1",
        num_probes=1,
        num_matvecs=5,
        groups="sample",
    )
    expected = torch.linalg.eigvalsh(2 * H[5:, 5:])
    assert_close(per_sample[1].nodes[0], expected, rtol=1e-6, atol=1e-10)


def test_diagonal_estimates_like_the_variables():
    model, batches = make_mlp(), batches_of(SIZES)
    H = oracle(model, batches, MODULES)
    exact = ts.model_hessian_diagonal_estimate(
        model, CE, batches, wrt="activations", modules=MODULES
    )
    assert exact.method == "exact"
    assert [d.shape for d in exact.diagonal] == [(n, q) for n in SIZES for q in (5, 4)]
    assert_close(torch.cat([d.reshape(-1) for d in exact.diagonal]), torch.diagonal(H))
    sketch = ts.model_hessian_diagonal_estimate(
        model, CE, batches, wrt="activations", modules=MODULES, method="xdiag", num_matvecs=60
    )
    assert [d.shape for d in sketch.diagonal] == [d.shape for d in exact.diagonal]
    per_sample = ts.model_hessian_diagonal_estimate(
        model, CE, batches, wrt="activations", modules=MODULES, groups="sample"
    )
    for i, rows in enumerate(sample_rows(batches, [5, 4])):
        parts = per_sample[i].diagonal
        assert [d.shape for d in parts] == [(5,), (4,)]
        assert_close(torch.cat(parts), 6 * torch.diagonal(H)[rows])


def test_analyses_of_the_operator_itself():
    model, batches = make_mlp(), batches_of(SIZES)
    H = oracle(model, batches)
    op = ts.HessianOperator.from_model(model, CE, batches, wrt="inputs")
    assert_close(ts.hessian_trace(op, method="exact").value, H.trace())
    assert_close(ts.hessian_diagonal_estimate(op).diagonal, torch.diagonal(H))
    top = ts.top_eigenvalues(op, k=3)
    assert_close(top.eigenvalues, torch.linalg.eigvalsh(H).flip(0)[:3], rtol=1e-6, atol=1e-8)
    density = ts.spectral_density(op, num_probes=1, num_matvecs=18)
    assert_close(density.nodes[0], torch.linalg.eigvalsh(H), rtol=1e-6, atol=1e-10)


# ----------------------------------------------------------------------------- hygiene


CALLS = {
    "trace": lambda m, d, **kw: ts.model_hessian_trace(m, CE, d, **kw),
    "eigen": lambda m, d, **kw: ts.model_top_eigenvalues(m, CE, d, **kw),
    "density": lambda m, d, **kw: ts.model_spectral_density(
        m, CE, d, num_matvecs=8, num_probes=2, **kw
    ),
    "diagonal": lambda m, d, **kw: ts.model_hessian_diagonal_estimate(m, CE, d, **kw),
    "sharpness": lambda m, d, **kw: ts.model_sharpness(m, CE, d, **kw),
}


@pytest.mark.parametrize("call", list(CALLS))
def test_no_side_effects_and_bitwise_reproducible(call):
    model = make_mlp(dropout=0.3).train()
    model[0].bias.grad = torch.ones_like(model[0].bias)
    batches = batches_of(SIZES)
    before = snapshot(model)
    kwargs = {"wrt": "activations", "modules": MODULES, "groups": "sample"}
    first = CALLS[call](model, batches, **kwargs)
    second = CALLS[call](model, batches, **kwargs)
    assert_unchanged(before, model)
    assert_identical(first, second)


def test_dropout_gives_one_hessian_across_functions():
    # exact trace = sum of the exact diagonal = trace of the operator's matrix, with dropout
    model = make_mlp(dropout=0.5).train()
    batches = batches_of(SIZES)
    kwargs = {"wrt": "activations", "modules": MODULES}
    trace = ts.model_hessian_trace(model, CE, batches, method="exact", **kwargs).value
    diagonal = ts.model_hessian_diagonal_estimate(model, CE, batches, **kwargs).diagonal
    op = ts.HessianOperator.from_model(model, CE, batches, **kwargs)
    matrix = op @ torch.eye(op.shape[0], dtype=DTYPE)
    assert_close(trace, sum(d.sum() for d in diagonal))
    assert_close(trace, matrix.trace())
    assert_close(matrix, oracle(model, batches, MODULES))


BAD = [
    (
        {"wrt": "activations", "modules": "1", "groups": "parameter"},
        ValueError,
        r"groups must be None, 'module', 'sample' or a dict of name -> module names or patterns "
        r"with wrt='activations'; got 'parameter'",
    ),
    (
        {"wrt": "inputs", "groups": "module"},
        ValueError,
        r"groups must be None, 'input', 'sample' with wrt='inputs'; got 'module'",
    ),
    ({"wrt": "inputs", "groups": {"a": "x"}}, TypeError, "groups must be None, 'input', 'sample'"),
    ({"wrt": "activations", "modules": "1", "groups": 3}, TypeError, "got int"),
    ({"wrt": "activations", "modules": "1", "groups": {}}, ValueError, "groups is an empty dict"),
    (
        {"wrt": "activations", "modules": "1", "groups": {"a": []}},
        ValueError,
        r"groups\['a'\] is empty",
    ),
    (
        {"wrt": "activations", "modules": "1", "groups": {"a": 1}},
        TypeError,
        r"groups\['a'\] must be",
    ),
    (
        {"wrt": "activations", "modules": "1", "groups": {1: "1"}},
        TypeError,
        "groups keys must be str",
    ),
    (
        {"wrt": "activations", "params": "0.weight", "modules": "1"},
        ValueError,
        "params selects parameters",
    ),
    ({"wrt": "activations"}, ValueError, "needs modules="),
    ({"modules": "1"}, ValueError, "with wrt='params'"),
]


@pytest.mark.parametrize("call", ["trace", "eigen", "density", "diagonal", "sharpness"])
@pytest.mark.parametrize(("kwargs", "error", "match"), BAD, ids=[str(b[0]) for b in BAD])
def test_bad_arguments_raise_before_any_forward_pass(call, kwargs, error, match):
    model = make_mlp()
    loss_fn = Recorder(CE)
    before = snapshot(model)
    fn = {
        "trace": ts.model_hessian_trace,
        "eigen": ts.model_top_eigenvalues,
        "density": ts.model_spectral_density,
        "diagonal": ts.model_hessian_diagonal_estimate,
        "sharpness": ts.model_sharpness,
    }[call]
    with pytest.raises(error, match=match):
        fn(model, loss_fn, batches_of(SIZES), **kwargs)
    assert loss_fn.calls == 0
    assert_unchanged(before, model)


def test_group_patterns_and_sample_axes_are_checked_after_the_first_pass():
    model = make_mlp()
    match = r"groups\['a'\] entry 'nope' matches no module of modules=; those are: 1, 3"
    with pytest.raises(ValueError, match=match):
        ts.model_hessian_trace(
            model, CE, batches_of(SIZES), wrt="activations", modules=MODULES, groups={"a": "nope"}
        )

    class Flat(nn.Module):
        def forward(self, x):
            return x.reshape(-1)

    flat = nn.Sequential(nn.Linear(3, 3), Flat(), nn.Unflatten(0, (-1, 3))).to(DTYPE)
    match = (
        r"groups='sample' needs each variable's leading dimension to count the samples, but "
        r"'1' has shape \(9,\) in data batch 0 of 3 samples"
    )
    with pytest.raises(ValueError, match=match):
        ts.model_top_eigenvalues(
            flat, CE, batches_of([3]), wrt="activations", modules="1", groups="sample"
        )
