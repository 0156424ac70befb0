"""What the analyses report in float32 holds against the float64 oracle.

Each architecture in each mode is copied to float32 and analysed on one batch with the
defaults, over the oracle's parameter subset; the reported quantities are then recomputed
from the float64 oracle Hessian of the same subset and batch: each eigenpair's residual
:math:`\\|Hx - \\theta x\\|` (``converged`` must mean it meets ``tol``), the exact trace, the
Hutch++ standard error against the spread of its estimates over seeds, and the spectral
density's extreme nodes against the spectrum's edges.
"""

import copy

import torch

import torch_secorder as ts
from tests.real import oracle

F32 = torch.finfo(torch.float32).eps


def float32(arch):
    """A float32 copy of the model and of the batch's floating-point tensors."""
    model = copy.deepcopy(arch.model).float()
    inputs, targets = arch.batch
    inputs = inputs.float() if inputs.is_floating_point() else inputs
    targets = targets.float() if targets.is_floating_point() else targets
    return model, (inputs, targets)


def test_eigenpairs_report_their_true_residuals(arch):
    model, batch = float32(arch)
    H = oracle.arch_hessian(arch.name, arch.mode, "batch")
    result = ts.model_top_eigenvalues(model, arch.loss_fn, batch, params=arch.subset, k=2)
    vectors = torch.cat([v.reshape(2, -1) for v in result.eigenvectors], dim=1).double()
    norm = float(torch.linalg.matrix_norm(H, 2))
    floor = 10 * F32 * norm  # what rounding the products to float32 leaves
    for theta, x, reported in zip(result.eigenvalues, vectors, result.residuals):
        x = x / x.norm()
        true = float((H @ x - float(theta) * x).norm())
        assert abs(float(reported) - true) <= 0.5 * true + floor
        if result.converged:
            assert true <= 1e-4 * abs(float(theta)) + floor
    top = torch.linalg.eigvalsh(H).flip(0)[:2]
    if result.converged:
        assert (result.eigenvalues.double() - top).abs().max() <= 1e-4 * norm + floor


def test_exact_trace_and_stderr(arch):
    model, batch = float32(arch)
    H = oracle.arch_hessian(arch.name, arch.mode, "batch")
    exact = ts.model_hessian_trace(model, arch.loss_fn, batch, params=arch.subset, method="exact")
    scale = float(H.diagonal().abs().sum())
    assert abs(float(exact.value) - float(H.trace())) <= 1e-5 * scale
    estimates = [
        ts.model_hessian_trace(
            model,
            arch.loss_fn,
            batch,
            params=arch.subset,
            method="hutch++",
            num_matvecs=12,
            generator=torch.Generator().manual_seed(seed),
        )
        for seed in range(30)
    ]
    values = torch.stack([e.value for e in estimates]).double()
    spread = float(values.std())
    mean_stderr = float(torch.stack([e.stderr for e in estimates]).double().mean())
    assert 0.5 * spread < mean_stderr < 2.0 * spread
    assert abs(float(values.mean()) - float(H.trace())) < 4 * spread / 30**0.5


def test_density_nodes_reach_the_edges_of_the_spectrum(arch):
    model, batch = float32(arch)
    H = oracle.arch_hessian(arch.name, arch.mode, "batch")
    density = ts.model_spectral_density(model, arch.loss_fn, batch, params=arch.subset)
    spectrum = torch.linalg.eigvalsh(H)
    width = float(spectrum[-1] - spectrum[0])
    nodes = density.nodes[density.weights > 0].double()
    assert float(nodes.min()) >= float(spectrum[0]) - 1e-3 * width
    assert float(nodes.max()) <= float(spectrum[-1]) + 1e-3 * width
    assert abs(float(nodes.min()) - float(spectrum[0])) <= 1e-3 * width
    assert abs(float(nodes.max()) - float(spectrum[-1])) <= 1e-3 * width
