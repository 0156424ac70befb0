import warnings
import weakref

import pytest
import torch

import torch_secorder as ts
from tests.analysis.operators import DTYPE, DenseOperator, dominant, generator, with_spectrum
from torch_secorder.analysis._driver import (
    LOCKSTEP_COLUMNS,
    Problem,
    SymmetryCheck,
    chunk_widths,
    max_columns,
    run,
)
from torch_secorder.analysis._estimators import hutch_plus_plus, hutchinson, xdiag
from torch_secorder.analysis._lanczos import lanczos_quadrature, thick_restart_lanczos

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


def lockstep(together, A, kind):
    """Run one algorithm of ``kind`` per block of ``ROWS`` in lockstep on ``together``, check
    each result against its block alone; return the problems and each one's widths alone."""
    problems = [
        Problem(algorithms(len(torch.arange(80)[rows]), seed)[kind], rows)
        for seed, rows in enumerate(ROWS)
    ]
    results = run("test", together, problems)
    alones = []
    for seed, (rows, result) in enumerate(zip(ROWS, results)):
        index = torch.arange(80)[rows]
        alone = DenseOperator(A[index][:, index])
        (expected,) = run("test", alone, [Problem(algorithms(len(index), seed)[kind])])
        for got, want in zip(flatten_result(result), flatten_result(expected)):
            torch.testing.assert_close(got, want)
        alones.append(alone)
    return problems, alones


@pytest.mark.parametrize("kind", range(5))
def test_groups_in_lockstep_equal_each_block_alone(kind):
    A = with_spectrum(dominant(80))
    together = DenseOperator(A)
    problems, alones = lockstep(together, A, kind)
    for problem, alone in zip(problems, alones):
        assert problem.num_matvecs == alone.num_matvecs
    steps = [alone.widths for alone in alones]
    # one product per step, its columns the problems' requests side by side
    assert together.calls == max(len(w) for w in steps)
    for step, width in enumerate(together.widths):
        assert width == sum(w[step] for w in steps if step < len(w))
    assert together.num_matvecs == sum(p.num_matvecs for p in problems)


@pytest.mark.parametrize("kind", range(5))
def test_an_operator_that_keeps_its_graph_gets_chunks_as_wide_as_one_request(kind):
    # (a closure, or one batch: the padded columns of G problems take what one would)
    A = with_spectrum(dominant(80))

    class Kept(DenseOperator):
        keeps_graph = True

    together = Kept(A)
    _, alones = lockstep(together, A, kind)
    steps = [alone.widths for alone in alones]
    expected_widths = []
    for step in range(max(len(w) for w in steps)):
        widths = [w[step] for w in steps if step < len(w)]
        expected_widths += chunk_widths(sum(widths), max(LOCKSTEP_COLUMNS, *widths))
    assert together.widths == expected_widths
    if kind == 1:  # three Hutchinson problems of 7 columns: three chunks a step
        assert len(expected_widths) == 3 * max(len(w) for w in steps)


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


def test_a_whole_request_receives_the_operators_product_without_a_copy():
    A = with_spectrum(dominant(40))
    returned = []

    class Recording(DenseOperator):
        def matmat(self, V):
            returned.append(super().matmat(V))
            return returned[-1]

    class Identity(DenseOperator):
        def matmat(self, V):
            return V  # a product aliasing its request is copied

    def steps():
        V = torch.ones(40, 1, dtype=DTYPE)
        HV = yield V
        return V, HV

    ((V, HV),) = run("test", Recording(A), [Problem(steps())])
    assert HV is returned[0]
    ((V, HV),) = run("test", Identity(torch.eye(40, dtype=DTYPE)), [Problem(steps())])
    assert HV.untyped_storage().data_ptr() != V.untyped_storage().data_ptr()
    torch.testing.assert_close(HV, V)


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
        match=r"lanczos: the operator is not symmetric: u\^T "
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
        check.judge(0.0)
    # products that vanish for a symmetric matrix: unit vectors of a diagonal one
    E = torch.eye(400, dtype=dtype)[:, :2]
    check.done = False
    check.update(E, torch.diag(torch.arange(400.0, dtype=dtype)) @ E)
    check.judge(0.0)


def test_symmetry_check_takes_rounding_noise_beside_larger_blocks_as_zero():
    # a block of rounding noise (a bias before a BatchNorm in training mode): asymmetric
    # relative to its own size, zero beside what the run's other problems have seen
    A = torch.randn(6, 6, generator=generator(0), dtype=DTYPE) * 1e-33
    V = torch.randn(6, 2, generator=generator(1), dtype=DTYPE)
    check = SymmetryCheck("test", DTYPE)
    check.update(V, A @ V)
    assert check.reach < 1e-31
    check.judge(1.0)  # no error
    check.done = False
    check.update(V, A @ V)
    with pytest.raises(ValueError, match="not symmetric"):
        check.judge(check.reach)  # alone, its own size is all there is to compare with


def test_symmetry_check_is_skipped_in_half_precision():
    check = SymmetryCheck("test", torch.bfloat16)
    A = torch.randn(10, 10, generator=generator(0)).bfloat16()
    V = torch.randn(10, 2, generator=generator(1)).bfloat16()
    check.update(V, A @ V)
    check.judge(0.0)  # no error


def test_max_columns_bounds_memory(monkeypatch):
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 8 * 100 * 3 + 5)
    cpu = torch.device("cpu")
    assert max_columns(100, torch.float64, cpu) == 3
    assert max_columns(100, torch.float32, cpu) == 6
    assert max_columns(10**9, torch.float64, cpu) == 1


def test_chunk_widths_are_the_fewest_and_even():
    assert chunk_widths(50, 24) == [17, 17, 16]
    assert chunk_widths(48, 24) == [24, 24]
    assert chunk_widths(7, 24) == [7]
    assert chunk_widths(0, 24) == []
    for total in range(60):
        widths = chunk_widths(total, 7)
        assert sum(widths) == total
        assert all(1 <= w <= 7 for w in widths)
        assert len(widths) == -(-total // 7)
        assert max(widths, default=0) - min(widths, default=0) <= 1


@pytest.mark.parametrize("kind", range(5))
def test_chunks_of_full_length_columns_stay_under_the_cap(kind, monkeypatch):
    # a cap of 2 columns of 80: every step of three groups is cut into padded chunks
    A = with_spectrum(dominant(80))
    unbounded = DenseOperator(A)
    problems = [
        Problem(algorithms(len(torch.arange(80)[rows]), seed)[kind], rows)
        for seed, rows in enumerate(ROWS)
    ]
    expected = run("test", unbounded, problems)
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 2 * 80 * 8)
    bounded = DenseOperator(A)
    chunked = [
        Problem(algorithms(len(torch.arange(80)[rows]), seed)[kind], rows)
        for seed, rows in enumerate(ROWS)
    ]
    results = run("test", bounded, chunked)
    assert max(bounded.widths) <= 2 < max(unbounded.widths)
    # the same columns, in chunks: every group sees the same products and counts its own
    assert bounded.num_matvecs == unbounded.num_matvecs
    for one, other, got, want in zip(chunked, problems, results, expected):
        assert one.num_matvecs == other.num_matvecs
        for a, b in zip(flatten_result(got), flatten_result(want)):
            torch.testing.assert_close(a, b)


def out_request(width: int):
    """An algorithm asking for its products in rows it keeps, below its vectors."""
    rows = torch.randn(2 * width, 40, generator=generator(1), dtype=DTYPE)
    HV = yield rows[:width].T, rows[width:].T
    return rows, HV


@pytest.mark.parametrize("kind", ["hessian operator", "other operator", "group"])
def test_products_go_where_the_request_asks(kind, monkeypatch):
    # a HessianOperator writes them there itself (in chunks where the cap cuts the request),
    # other operators' products and a group's gathered ones are copied there
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 3 * 40 * 8)
    A = with_spectrum(dominant(40))
    x = torch.zeros(40, dtype=DTYPE, requires_grad=True)
    hessian = ts.HessianOperator(lambda: 0.5 * x @ (A @ x), [x])
    outs = []
    matmat = ts.HessianOperator.matmat

    def recording(self, V, **kwargs):
        outs.append(kwargs.get("out"))
        return matmat(self, V, **kwargs)

    monkeypatch.setattr(ts.HessianOperator, "matmat", recording)
    operator = DenseOperator(A) if kind == "other operator" else hessian
    rows = None if kind != "group" else slice(0, 40)
    problem = Problem(out_request(5), rows)
    other = Problem(out_request(1), slice(0, 40)) if kind == "group" else None
    results = run("test", operator, [problem] + ([other] if other else []))
    for (stored, HV), width in zip(results, (5, 1)):
        assert HV.data_ptr() == stored[width].data_ptr()  # the rows below the vectors
        torch.testing.assert_close(HV, A @ stored[:width].T)
    if kind == "hessian operator":
        assert [o.shape[1] for o in outs] == [3, 2]  # the chunks' columns of out
    elif kind == "group":
        assert outs == [None, None]  # (padded chunks: copied)


@pytest.mark.parametrize(
    "analysis",
    [
        lambda H: ts.top_eigenvalues(H, k=2),
        lambda H: ts.hessian_trace(H, method="hutch++", num_matvecs=30),
        lambda H: ts.spectral_density(H, num_matvecs=20, num_probes=1),
        lambda H: ts.spectral_density(H, num_matvecs=40, num_probes=4),
    ],
    ids=["lanczos", "hutch++", "density", "density-4"],
)
def test_analyses_have_the_operator_write_into_memory_they_keep(analysis, monkeypatch):
    # (Hutch++ reuses one buffer over several blocks: chunks of 4 columns make several)
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 4 * 40 * 8)
    A = with_spectrum(dominant(40))
    x = torch.zeros(40, dtype=DTYPE, requires_grad=True)
    written = []
    matmat = ts.HessianOperator.matmat

    def recording(self, V, **kwargs):
        written.append(kwargs.get("out") is not None)
        return matmat(self, V, **kwargs)

    monkeypatch.setattr(ts.HessianOperator, "matmat", recording)
    result = analysis(ts.HessianOperator(lambda: 0.5 * x @ (A @ x), [x]))
    assert written
    assert all(written)
    assert result.num_matvecs > 0


def test_a_whole_request_wider_than_the_cap_is_split(monkeypatch):
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 3 * 40 * 8)
    A = with_spectrum(dominant(40))
    operator = DenseOperator(A)

    def steps():
        V = torch.randn(40, 7, generator=generator(0), dtype=DTYPE)
        HV = yield V
        return V, HV

    problem = Problem(steps())
    ((V, HV),) = run("test", operator, [problem])
    assert operator.widths == [3, 2, 2]
    torch.testing.assert_close(HV, A @ V)
    assert problem.num_matvecs == 7


def test_symmetry_is_checked_per_group_across_chunks(monkeypatch):
    # group 1's block is asymmetric, the others are symmetric; chunks mix the groups
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 4 * 80 * 8)
    A = with_spectrum(dominant(80))
    index = torch.arange(80)[ROWS[1]]
    A[index[:, None], index] += torch.triu(torch.ones(30, 30, dtype=DTYPE), 1)
    problems = [
        Problem(hutch_plus_plus(len(torch.arange(80)[rows]), 9, DTYPE, CPU, generator(seed)), rows)
        for seed, rows in enumerate(ROWS)
    ]
    with pytest.raises(ValueError, match=r"test: the operator is not symmetric"):
        run("test", DenseOperator(A), problems)


def test_empty_requests_between_others_under_a_cap(monkeypatch):
    monkeypatch.setattr("torch_secorder.analysis._memory.BLOCK_BYTES", 2 * 30 * 8)
    A = with_spectrum(dominant(30))

    def steps(n, width):
        V = torch.randn(n, width, generator=generator(width), dtype=DTYPE)
        HV = yield V
        return V, HV

    # (rows, request width): empty requests before, between and after the others
    layout = [(slice(0, 5), 0), (slice(10, 20), 3), (slice(20, 25), 0), (torch.arange(25, 30), 2)]
    problems = [Problem(steps(len(torch.arange(30)[r]), w), r) for r, w in layout]
    operator = DenseOperator(A)
    results = run("test", operator, problems)
    assert operator.widths == [2, 2, 1]
    for problem, (V, HV) in zip(problems, results):
        index = torch.arange(30)[problem.rows]
        torch.testing.assert_close(HV, A[index][:, index] @ V)
        assert problem.num_matvecs == V.shape[1]


def test_the_driver_lets_an_algorithm_free_its_last_request():
    released = []

    def steps(n):
        V = torch.ones(n, 2, dtype=DTYPE)
        request = weakref.ref(V)
        yield V
        del V
        released.append(request() is None)  # no reference left but the algorithm's
        yield torch.ones(n, 1, dtype=DTYPE)
        return None

    operator = DenseOperator(torch.eye(20, dtype=DTYPE))
    run("test", operator, [Problem(steps(20))])
    run("test", operator, [Problem(steps(10), slice(0, 10)), Problem(steps(10), slice(10, 20))])
    assert released == [True, True, True]


def test_progress_counts_the_analysis_products(monkeypatch):
    import tqdm.auto

    from tests.core.structured.helpers import CE, F64, labels, randn

    bars = []

    class Bar:
        def __init__(self, total, desc, **kwargs):
            self.total, self.desc, self.counts = total, desc, []
            bars.append(self)

        def update(self, n):
            self.counts.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    data = [(randn(4, 3), labels(4, 2)), (randn(3, 3, seed=1), labels(3, 2, seed=2))]
    result = ts.model_hessian_trace(
        model.to(F64), CE, data, groups="module", method="hutchinson", num_matvecs=7, progress=True
    )
    (bar,) = bars  # one bar over products, not one per pass over the batches
    assert bar.desc == "model_hessian_trace"
    assert bar.total == 2 * 7
    assert sum(bar.counts) == sum(r.num_matvecs for r in result.values()) == 14
    bars.clear()
    eigen = ts.model_top_eigenvalues(model, CE, data, max_matvecs=40, progress=True)
    (bar,) = bars
    assert bar.total == 40  # at most: Lanczos stops once converged
    assert sum(bar.counts) == eigen.num_matvecs <= 40


def test_an_analysis_that_will_take_long_warns_after_its_first_products(monkeypatch):
    from torch_secorder.core import _progress

    monkeypatch.setattr(_progress, "LONG_SECONDS", 0.0)
    monkeypatch.setattr(_progress, "TIMED_PRODUCTS", 10)
    operator = DenseOperator(torch.eye(6, dtype=torch.float64))
    chunked = {"max_bytes": 8 * 5 * 6 * 8}  # chunks of 5 probes: the second one is timed
    with pytest.warns(UserWarning, match=r"^hessian_trace: the analysis takes 30 Hessian-vector"):
        ts.hessian_trace(operator, method="hutchinson", num_matvecs=30, **chunked)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ts.top_eigenvalues(operator, max_matvecs=30, **chunked)  # a cap, not a cost: no warning
        monkeypatch.setattr(_progress, "TIMED_PRODUCTS", 31)
        ts.hessian_trace(operator, method="hutchinson", num_matvecs=30, **chunked)  # too few


def test_products_that_are_not_finite_are_refused_at_the_first():
    A = with_spectrum(dominant(30))
    A[0, 0] = float("nan")
    operator = DenseOperator(A)
    steps = thick_restart_lanczos(30, 1, "largest", 1e-8, 100, DTYPE, CPU, generator(0))
    with pytest.raises(ValueError, match=r"^lanczos: the operator's products are not finite"):
        run("lanczos", operator, [Problem(steps)])
    assert operator.num_matvecs == 1
