import math

import pytest
import torch

import torch_secorder as ts
from tests.analysis.operators import (
    DTYPE,
    DenseOperator,
    clustered,
    dominant,
    generator,
    indefinite,
    tanh_mlp,
    with_spectrum,
)
from torch_secorder.analysis.density import _density_result

SPECTRA = {"dominant": dominant(300), "clustered": clustered(), "indefinite": indefinite(300)}


def mixture(result) -> torch.Tensor:
    """The Gaussian mixture of the result's nodes and weights, on its grid, unnormalised."""
    t = result.grid[:, None]
    nodes = result.nodes.reshape(-1)
    mass = result.weights.reshape(-1) / result.nodes.shape[0]
    kernel = torch.exp(-0.5 * ((t - nodes) / result.sigma) ** 2)
    return kernel @ mass / (result.sigma * math.sqrt(2 * math.pi))


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_defaults_place_the_extreme_nodes_at_the_edges(spectrum):
    lam = SPECTRA[spectrum]
    result = ts.spectral_density(DenseOperator(with_spectrum(lam)))
    span = float(lam.max() - lam.min())
    assert abs(float(result.nodes.min() - lam.min())) <= 1e-6 * span
    assert abs(float(result.nodes.max() - lam.max())) <= 1e-6 * span
    # every probe's extreme nodes, not only the pooled ones
    torch.testing.assert_close(result.nodes[:, 0], lam.min().expand(4), atol=1e-6 * span, rtol=0)
    torch.testing.assert_close(result.nodes[:, -1], lam.max().expand(4), atol=1e-6 * span, rtol=0)


@pytest.mark.parametrize("spectrum", SPECTRA)
def test_density_is_a_normalised_broadened_quadrature(spectrum):
    result = ts.spectral_density(DenseOperator(with_spectrum(SPECTRA[spectrum])))
    assert result.grid.shape == result.density.shape == (1000,)
    assert bool((result.grid.diff() > 0).all())
    assert bool((result.density >= 0).all())
    torch.testing.assert_close(
        torch.trapezoid(result.density, result.grid), torch.ones((), dtype=DTYPE)
    )
    # the broadening's mass lies on the grid: the mixture integrates to 1 within 1e-4
    unnormalised = mixture(result)
    assert abs(float(torch.trapezoid(unnormalised, result.grid)) - 1) < 1e-4
    torch.testing.assert_close(
        result.density, unnormalised / torch.trapezoid(unnormalised, result.grid)
    )


def test_weights_are_probability_vectors_and_nodes_ascend():
    result = ts.spectral_density(
        DenseOperator(with_spectrum(dominant())), num_matvecs=90, num_probes=3
    )
    assert result.nodes.shape == result.weights.shape == (3, 30)
    assert bool((result.weights >= 0).all())
    torch.testing.assert_close(result.weights.sum(dim=1), torch.ones(3, dtype=DTYPE))
    assert bool((result.nodes.diff(dim=1) >= 0).all())
    assert result.num_matvecs == 90


def test_quadrature_matches_moments_of_the_spectrum():
    # Gauss quadrature with s nodes is exact for polynomials of degree 2s - 1 per probe, so the
    # average over probes of sum_j tau_j theta_j^p estimates tr(A^p) / P without bias.
    lam = dominant()
    A = with_spectrum(lam)
    result = ts.spectral_density(
        DenseOperator(A), num_matvecs=64 * 10, num_probes=64, generator=generator(0)
    )
    for power in (1, 2):
        per_probe = (result.weights * result.nodes**power).sum(dim=1)
        estimate = per_probe.mean()
        stderr = per_probe.std() / math.sqrt(len(per_probe))
        truth = (lam**power).mean()
        assert abs(float(estimate - truth)) <= 4 * float(stderr)


def test_exhausted_krylov_space_is_exact_and_padded():
    lam = torch.tensor([2.0, 2.0, 2.0, -1.0, -1.0, 5.0], dtype=DTYPE)  # 3 distinct eigenvalues
    operator = DenseOperator(with_spectrum(lam))
    result = ts.spectral_density(operator, num_matvecs=10, num_probes=2)
    assert result.nodes.shape == (2, 5)
    for nodes, weights in zip(result.nodes, result.weights):
        real = weights > 1e-12
        torch.testing.assert_close(nodes[real], torch.tensor([-1.0, 2.0, 5.0], dtype=DTYPE))
        assert bool((weights[~real] == 0).all())
        assert bool((nodes[~real] == nodes[0]).all())
        assert real.tolist() == [False, False, True, True, True]  # padded in front: ascending
        assert bool((nodes[1:] >= nodes[:-1]).all())
    # each probe stopped after 3 products (its Krylov space has dimension 3)
    assert result.num_matvecs == operator.num_matvecs == 6


def test_steps_are_capped_at_the_dimension():
    operator = DenseOperator(with_spectrum(dominant(12)))
    result = ts.spectral_density(operator, num_matvecs=100, num_probes=2)
    assert result.nodes.shape == (2, 12)
    assert result.num_matvecs == 24
    torch.testing.assert_close(result.nodes[0], dominant(12).sort().values)


def test_all_probes_advance_in_one_product_per_step():
    operator = DenseOperator(with_spectrum(dominant()))
    ts.spectral_density(operator, num_matvecs=40, num_probes=4)
    assert operator.widths == [4] * 10


def test_sigma_and_grid_size():
    operator = DenseOperator(with_spectrum(dominant()))
    result = ts.spectral_density(operator, num_matvecs=40, num_probes=4, grid_size=50, sigma=0.7)
    assert result.sigma == 0.7
    assert result.grid.shape == (50,)
    span = float(result.nodes.max() - result.nodes.min())
    torch.testing.assert_close(result.grid[0], result.nodes.min() - 4 * 0.7 - 0.01 * span)
    torch.testing.assert_close(result.grid[-1], result.nodes.max() + 4 * 0.7 + 0.01 * span)
    default = ts.spectral_density(operator, num_matvecs=40, num_probes=4)
    assert default.sigma == pytest.approx(0.5 * span / 10)


@pytest.mark.parametrize(("sigma", "grid_size"), [(1e-8, 1000), (1e-4, 3)])
def test_a_width_below_the_grid_spacing_keeps_every_node_mass(sigma, grid_size):
    # the grid's points would miss Gaussians narrower than its spacing: their cells' means
    nodes = torch.tensor([[-1.0, 0.5, 2.0, 4.0]], dtype=DTYPE)
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4]], dtype=DTYPE)
    result = _density_result(nodes, weights, 4, grid_size, sigma)
    assert bool(torch.isfinite(result.density).all())
    torch.testing.assert_close(
        torch.trapezoid(result.density, result.grid), torch.ones((), dtype=DTYPE)
    )
    if grid_size > 3:  # each node's mass in its own cell, around the grid point nearest it
        spacing = float(result.grid[1] - result.grid[0])
        nearest = (result.grid[:, None] - nodes[0]).abs().argmin(dim=0)
        torch.testing.assert_close(result.density[nearest] * spacing, weights[0])


def test_point_spectrum_gets_a_nonzero_width():
    result = _density_result(
        torch.full((1, 3), 2.0, dtype=DTYPE), torch.full((1, 3), 1 / 3, dtype=DTYPE), 3, 101, None
    )
    assert result.sigma > 0
    assert int(result.density.argmax()) == 50
    torch.testing.assert_close(
        torch.trapezoid(result.density, result.grid), torch.ones((), dtype=DTYPE)
    )


def test_closure_and_model_forms_match_the_dense_hessian():
    model, loss_fn, inputs, targets = tanh_mlp()
    params = list(model.parameters())
    func = lambda: loss_fn(model(inputs), targets)  # noqa: E731
    eigenvalues = torch.linalg.eigvalsh(ts.hessian_matrix(func, params))
    closure = ts.spectral_density(func, params, num_matvecs=120, num_probes=2)
    operator = ts.spectral_density(
        ts.HessianOperator.from_model(model, loss_fn, (inputs, targets)),
        num_matvecs=120,
        num_probes=2,
    )
    model_form = ts.model_spectral_density(
        model, loss_fn, (inputs, targets), num_matvecs=120, num_probes=2
    )
    for result in (closure, operator, model_form):
        assert result.nodes.shape == (2, 54)  # 60 steps capped at P = 54
        torch.testing.assert_close(result.nodes[0], eigenvalues)
    torch.testing.assert_close(closure.density, model_form.density)


def test_model_groups_run_together():
    model, loss_fn, inputs, targets = tanh_mlp()
    results = ts.model_spectral_density(
        model, loss_fn, (inputs, targets), groups="module", num_matvecs=40, num_probes=4
    )
    assert list(results) == ["0", "2", "4"]
    for result in results.values():
        torch.testing.assert_close(result.weights.sum(dim=1), torch.ones(4, dtype=DTYPE))
    assert results["0"].num_matvecs == results["2"].num_matvecs == 40
    # The output layer's block under MSE is I_2 (x) C with C of size 5: every probe's Krylov
    # space is exhausted after 5 steps.
    assert results["4"].num_matvecs == 20
    assert int((results["4"].weights > 1e-12).sum(dim=1).max()) == 5


class Diagonal:
    """diag(d) as an operator: large sizes at the cost of an elementwise product."""

    def __init__(self, d: torch.Tensor) -> None:
        self.d, self.shape, self.dtype, self.device = d, (len(d), len(d)), d.dtype, d.device

    def matmat(self, V: torch.Tensor) -> torch.Tensor:
        return self.d[:, None] * V


@pytest.mark.parametrize(
    ("size", "probes"), [(21845, 4), (21846, 3), (32767, 3), (32768, 2), (65535, 2), (65536, 1)]
)
def test_default_probes_fall_with_the_size(size, probes):
    # the fewest probes (at most 4) whose count times P reaches 2^16, 100 steps each
    operator = Diagonal(torch.linspace(-1, 2, size, dtype=DTYPE))
    result = ts.spectral_density(operator)
    assert result.nodes.shape == (probes, 100)
    assert result.num_matvecs == 100 * probes
    # a budget alone keeps the rule; the rule never takes more probes than the budget
    assert ts.spectral_density(operator, num_matvecs=50).nodes.shape == (probes, 50 // probes)
    small = DenseOperator(with_spectrum(dominant()))
    assert ts.spectral_density(small, num_matvecs=3).nodes.shape == (3, 1)
    assert ts.spectral_density(small).nodes.shape == (4, 100)


def test_model_groups_take_default_probes_by_their_size():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Tanh(), torch.nn.Linear(256, 2))
    model = model.double()
    data = (torch.randn(4, 256, dtype=DTYPE), torch.randn(4, 2, dtype=DTYPE))
    results = ts.model_spectral_density(
        model, torch.nn.MSELoss(), data, groups="module", num_matvecs=8
    )
    assert results["0"].nodes.shape == (1, 8)  # 65,792 parameters
    assert results["2"].nodes.shape == (4, 2)  # 514
    assert results["0"].num_matvecs == results["2"].num_matvecs == 8


def test_global_rng_is_untouched_and_defaults_reproducible():
    operator = DenseOperator(with_spectrum(dominant()))
    state = torch.get_rng_state()
    first = ts.spectral_density(operator, num_matvecs=40)
    assert torch.equal(torch.get_rng_state(), state)
    second = ts.spectral_density(operator, num_matvecs=40)
    assert torch.equal(first.nodes, second.nodes)
    third = ts.spectral_density(operator, num_matvecs=40, generator=generator(9))
    assert not torch.equal(first.weights, third.weights)


def test_float32_operator():
    result = ts.spectral_density(DenseOperator(with_spectrum(dominant()).float()), num_matvecs=80)
    assert result.grid.dtype == result.density.dtype == result.nodes.dtype == torch.float32
    assert abs(float(result.nodes.max()) - 100.0) < 1e-3
