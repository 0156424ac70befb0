import pytest
import torch

from tests.analysis.operators import DTYPE, DenseOperator, dominant, generator, with_spectrum
from torch_secorder.analysis._driver import Problem, SymmetryCheck, max_columns, run
from torch_secorder.analysis.diagonal_estimate import xdiag
from torch_secorder.analysis.lanczos import lanczos_quadrature, thick_restart_lanczos
from torch_secorder.analysis.trace import hutch_plus_plus, hutchinson

CPU = torch.device("cpu")
ROWS = [slice(0, 30), torch.cat([torch.arange(30, 50), torch.arange(70, 80)]), slice(50, 70)]


def algorithms(n: int, seed: int):
    """One instance of each kind of algorithm, for a block of size n."""
    return [
        thick_restart_lanczos(n, 2, "largest", 1e-8, 200, DTYPE, CPU, generator(seed)),
        hutchinson(n, 7, DTYPE, CPU, generator(seed)),
        lanczos_quadrature(n, 6, 3, DTYPE, CPU, generator(seed)),
        hutch_plus_plus(n, 9, DTYPE, CPU, generator(seed)),
        xdiag(n, 8, DTYPE, CPU, generator(seed)),
    ]


def flatten_result(result) -> list[torch.Tensor]:
    if isinstance(result, tuple):
        return list(result)
    return [result.values, result.vectors, result.residuals]


@pytest.mark.parametrize("kind", range(5))
def test_groups_in_lockstep_equal_each_block_alone(kind):
    A = with_spectrum(dominant(80))
    together = DenseOperator(A)
    problems = [
        Problem(algorithms(len(torch.arange(80)[rows]), seed)[kind], rows)
        for seed, rows in enumerate(ROWS)
    ]
    results = run("test", together, problems)
    steps = []
    for seed, (rows, problem, result) in enumerate(zip(ROWS, problems, results)):
        index = torch.arange(80)[rows]
        alone = DenseOperator(A[index][:, index])
        (expected,) = run("test", alone, [Problem(algorithms(len(index), seed)[kind])])
        for got, want in zip(flatten_result(result), flatten_result(expected)):
            torch.testing.assert_close(got, want)
        assert problem.num_matvecs == alone.num_matvecs
        steps.append(alone.widths)
    # one product per step, its columns the problems' requests side by side
    assert together.calls == max(len(w) for w in steps)
    for step, width in enumerate(together.widths):
        assert width == sum(w[step] for w in steps if step < len(w))
    assert together.num_matvecs == sum(p.num_matvecs for p in problems)


def test_single_whole_problem_passes_its_block_unchanged():
    A = with_spectrum(dominant(40))
    seen = []

    class Recording(DenseOperator):
        def matmat(self, V):
            seen.append(V)
            return super().matmat(V)

    def steps():
        V = torch.ones(40, 2, dtype=DTYPE)
        HV = yield V
        return V, HV

    problem = Problem(steps())
    ((V, HV),) = run("test", Recording(A), [problem])
    assert seen[0] is V
    torch.testing.assert_close(HV, A @ V)
    assert problem.num_matvecs == 2


def test_problem_without_products_and_empty_requests():
    def immediate():
        return "done"
        yield  # pragma: no cover

    def empty():
        HV = yield torch.zeros(10, 0, dtype=DTYPE)
        return HV.shape

    operator = DenseOperator(torch.eye(10, dtype=DTYPE))
    problems = [Problem(immediate()), Problem(empty())]
    assert run("test", operator, problems) == ["done", (10, 0)]
    assert operator.num_matvecs == 0


def test_wrong_matmat_shape_is_reported():
    class Broken(DenseOperator):
        def matmat(self, V):
            return super().matmat(V)[:, :1]

    with pytest.raises(
        ValueError,
        match=r"test: func_or_operator.matmat returned \(20, 1\) for "
        r"a \(20, 7\) input; expected a tensor of shape \(20, 7\)\.",
    ):
        run(
            "test",
            Broken(torch.eye(20, dtype=DTYPE)),
            [Problem(hutchinson(20, 7, DTYPE, CPU, generator(0)))],
        )


def test_symmetry_check_flags_asymmetric_pairs_across_steps():
    A = torch.randn(50, 50, generator=generator(1), dtype=DTYPE)
    steps = thick_restart_lanczos(50, 1, "largest", 1e-8, 100, DTYPE, CPU, generator(0))
    operator = DenseOperator(A)
    with pytest.raises(
        ValueError,
        match=r"lanczos: func_or_operator is not symmetric: u\^T "
        r"\(A v\) = .* but v\^T \(A u\) = .*; expected a symmetric operator",
    ):
        run("lanczos", operator, [Problem(steps)])
    assert operator.num_matvecs == 2  # found at the second product


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetry_check_accepts_symmetric_operators_with_rounding(dtype):
    A = with_spectrum(dominant(400)).to(dtype)
    check = SymmetryCheck("test", dtype)
    for seed in range(20):
        V = torch.randn(400, 2, generator=generator(seed), dtype=dtype)
        check.done = False
        check.update(V, A @ V)
    # products that vanish for a symmetric matrix: unit vectors of a diagonal one
    E = torch.eye(400, dtype=dtype)[:, :2]
    check.done = False
    check.update(E, torch.diag(torch.arange(400.0, dtype=dtype)) @ E)


def test_symmetry_check_is_skipped_in_half_precision():
    check = SymmetryCheck("test", torch.bfloat16)
    A = torch.randn(10, 10, generator=generator(0)).bfloat16()
    V = torch.randn(10, 2, generator=generator(1)).bfloat16()
    check.update(V, A @ V)  # no error


def test_max_columns_bounds_memory(monkeypatch):
    monkeypatch.setattr("torch_secorder.analysis._driver.BLOCK_BYTES", 8 * 100 * 3 + 5)
    assert max_columns(100, torch.float64) == 3
    assert max_columns(100, torch.float32) == 6
    assert max_columns(10**9, torch.float64) == 1
