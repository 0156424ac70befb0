"""Differential fuzzing of the structured exact diagonal against the generic path.

``model_hessian_diagonal`` reads layers off products with respect to their outputs (the layer
rules and the Gauss-Newton rule) wherever a check on the model and batch proves that exact; the
closure form ``hessian_diagonal`` never takes a shortcut (one unit-vector product per element).
Both must agree on every model, loss, hook, batch size and parameter selection. For each seed,
:func:`tests.core.fuzz.build_case` draws a small float64 model, loss, batch (1 to 9
samples) and ``params=`` selection, and :func:`test_structured_matches_generic` checks:

* the structured diagonal equals the generic one to 1e-10 relative (``atol`` 1e-10 times the
  largest generic entry, at least 1e-16), or both raise the same type of exception, and the
  call leaves no trace on the model or the global RNG;
* for every 5th seed, where ``torch.func`` is trusted on the model, the generic diagonal equals
  the diagonal of a dense ``torch.func`` Hessian (the oracle of ``tests/reference.py``);
* for every 2nd seed, the data-set form ``HessianOperator.from_model(...).diagonal()`` equals
  the size-weighted mean of the batches' generic diagonals, batch ``i`` run under RNG seed
  ``i`` (the last batch often holds one sample).

A failure names its seed (test id ``seed-<n>``), describes the model and lists the parameters
whose diagonals differ. :func:`test_shortcuts_are_exercised` checks, with ``diagonal_plan``,
that the shortcuts are actually taken on many of the models. The default run checks seeds 0 to
299 (``--fuzz-seed 0 --fuzz-count 300``); before a shortcut ships, run thousands, e.g.::

    pytest tests/core/test_structured_fuzz.py --fuzz-count 10000
    pytest tests/core/test_structured_fuzz.py --fuzz-seed 10000 --fuzz-count 10000

The model forms run the forward pass under RNG seed 0 (the dropout masks of batch 0 of a data
set) on private copies of the buffers; the generic path gets the same with
``batch_loss`` (private buffers) and ``torch.manual_seed(0)`` before the closure form, which
draws from the global RNG's state.
"""

import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

import torch_secorder as ts
from tests import reference as ref
from tests.core.fuzz import VOCABULARY, FuzzCase, build_case
from tests.core.helpers import assert_unchanged, snapshot
from torch_secorder.core._model import batch_loss, call_model

pytestmark = [
    # torch's note that padding="same" with an even kernel pads a copy of the input (speed only)
    pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel:UserWarning"),
    # torch.func's note that a batching rule is missing (the oracle falls back to a loop)
    pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning"),
]

RTOL = 1e-10
"""Both paths are exact in float64: they may differ by rounding only, far below this."""

FIXED_SEEDS = range(300)
"""The seeds of the default run, on which coverage and the use of shortcuts are checked."""

DENSE_EVERY = 5
DATA_SET_EVERY = 2


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """One test item per seed of ``--fuzz-seed`` .. ``--fuzz-seed + --fuzz-count - 1``."""
    if "fuzz_seed" in metafunc.fixturenames:
        first = metafunc.config.getoption("--fuzz-seed")
        count = metafunc.config.getoption("--fuzz-count")
        metafunc.parametrize("fuzz_seed", range(first, first + count), ids=lambda s: f"seed-{s}")


def _outcome(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> tuple[Any, Exception | None]:
    """The result of ``fn(*args, **kwargs)``, or the exception it raised (the two paths must
    agree on raising, and on the type)."""
    try:
        return fn(*args, **kwargs), None
    except Exception as err:  # noqa: BLE001 - compared with the other path's outcome
        return None, err


def _generic(case: FuzzCase, inputs: Any, targets: Tensor, params: list[Tensor], seed: int):
    """The closure form on the model's loss, its forward pass under RNG seed ``seed``."""
    func = batch_loss(case.model, case.loss_fn, inputs, targets)
    torch.manual_seed(seed)
    return ts.hessian_diagonal(func, params)


def _same_outcome(case: FuzzCase, what: str, error: Any, expected_error: Any) -> bool:
    """Whether both calls returned; if either raised, both raised the same type."""
    if error is None and expected_error is None:
        return True
    assert type(error) is type(expected_error), (
        f"{case.description}\n{what} raised {error!r}, the generic path {expected_error!r}"
    )
    return False


def _assert_close(
    case: FuzzCase,
    what: str,
    names: Sequence[str],
    actual: Sequence[Tensor],
    expected: Sequence[Tensor],
) -> None:
    """``actual`` equals ``expected`` to :data:`RTOL`, with ``atol`` :data:`RTOL` times the
    largest expected entry; a NaN entry (a root at zero on the path) must be NaN on both sides.

    The message lists every parameter that differs, with its largest error relative to the
    largest expected entry.
    """
    finite = [e[e.isfinite()] for e in expected]
    largest = max((float(e.abs().max()) for e in finite if e.numel()), default=0.0)
    # a selection whose diagonal is all below 1e-6 is compared to 1e-16: the rounding of
    # order-one terms that cancel to an exact zero (a bias before BatchNorm in train mode)
    scale = max(largest, 1e-6)
    wrong = []
    for name, a, e in zip(names, actual, expected):
        close = torch.isclose(a, e, rtol=RTOL, atol=RTOL * scale, equal_nan=True)
        if not bool(close.all()):
            error = float((a - e).abs().nan_to_num(nan=math.inf).max()) / scale
            wrong.append(f"{name} ({error:.1e})")
    assert not wrong, (
        f"{case.description}\n{what} differs (largest error relative to the largest entry, "
        f"{largest:.2e}): {', '.join(wrong)}"
    )


class _Loss(nn.Module):
    """A case's loss as a module, so ``functional_call`` replaces the parameters for the forward
    pass and the loss alike (weight decay reads ``model.parameters()``)."""

    def __init__(self, case: FuzzCase) -> None:
        super().__init__()
        self.model = case.model
        self.loss_fn = case.loss_fn
        self.args = (case.inputs, case.targets)

    def forward(self) -> Tensor:
        inputs, targets = self.args
        return self.loss_fn(call_model(self.model, inputs), targets)


def _dense_diagonal(case: FuzzCase, names: list[str]) -> list[Tensor]:
    """The diagonal of the dense ``torch.func`` Hessian, forward pass under RNG seed 0."""
    loss = _Loss(case)
    named = dict(case.model.named_parameters())
    constants = {f"model.{n}": p.detach() for n, p in named.items() if n not in names}

    def fn(*tensors: Tensor) -> Tensor:
        params = {**constants, **{f"model.{n}": t for n, t in zip(names, tensors)}}
        buffers = {f"model.{n}": b.detach().clone() for n, b in case.model.named_buffers()}
        return functional_call(loss, (params, buffers), ())

    tensors = [named[n] for n in names]
    torch.manual_seed(0)
    return ref.diagonal(ref.hessian(fn, tensors), tensors)


def _check_data_set(case: FuzzCase, names: list[str], params: list[Tensor]) -> None:
    """``HessianOperator.from_model(...).diagonal()`` against the batches' generic diagonals."""
    total = [torch.zeros_like(p) for p in params]
    count, expected_error = 0, None
    for index, (inputs, targets) in enumerate(case.batches):
        diagonal, expected_error = _outcome(_generic, case, inputs, targets, params, seed=index)
        if expected_error is not None:
            break
        size = (inputs[0] if isinstance(inputs, tuple) else inputs).shape[0]
        for acc, d in zip(total, diagonal):
            acc.add_(d, alpha=size)
        count += size
    before = snapshot(case.model)
    operator = ts.HessianOperator.from_model(
        case.model, case.loss_fn, case.batches, params=case.params
    )
    result, error = _outcome(operator.diagonal)
    assert_unchanged(before, case.model)
    what = f"the data-set form on batches of {[len(t) for _, t in case.batches]} target rows"
    if _same_outcome(case, what, error, expected_error):
        expected = [acc / count for acc in total]
        _assert_close(case, what, names, ts.unflatten(result, params), expected)


def test_structured_matches_generic(fuzz_seed: int) -> None:
    case = build_case(fuzz_seed)
    names = list(ts.select_params(case.model, case.params))
    params = [case.model.get_parameter(n) for n in names]
    with case.active():
        expected, expected_error = _outcome(
            _generic, case, case.inputs, case.targets, params, seed=0
        )
        before = snapshot(case.model)
        result, error = _outcome(
            ts.model_hessian_diagonal,
            case.model,
            case.loss_fn,
            case.inputs,
            case.targets,
            params=case.params,
        )
        assert_unchanged(before, case.model)
        if expected_error is None and fuzz_seed % DENSE_EVERY == 0 and case.dense_oracle:
            dense = _dense_diagonal(case, names)
            _assert_close(case, "the generic path against torch.func", names, expected, dense)
        if _same_outcome(case, "model_hessian_diagonal", error, expected_error):
            _assert_close(case, "model_hessian_diagonal", names, result, expected)
        if fuzz_seed % DATA_SET_EVERY == 1:
            _check_data_set(case, names, params)


def test_cases_cover_the_vocabulary() -> None:
    """The default seeds draw every operation, module, hook and loss of the vocabulary."""
    seen = Counter(tag for seed in FIXED_SEEDS for tag in build_case(seed).tags)
    assert set(VOCABULARY) <= set(seen), f"never drawn: {sorted(set(VOCABULARY) - set(seen))}"


def _data(case: FuzzCase) -> list[Tensor]:
    """Every tensor of a case's batch and data set."""
    tensors = []
    for inputs, targets in [(case.inputs, case.targets), *case.batches]:
        tensors += [*(inputs if isinstance(inputs, tuple) else (inputs,)), targets]
    return tensors


def test_cases_are_reproducible() -> None:
    """A seed gives the same case every time, and building one leaves the global RNG alone."""
    state = torch.get_rng_state()
    for seed in (0, 1, 2, 3):
        first, second = build_case(seed), build_case(seed)
        assert first.description == second.description
        states = first.model.state_dict(), second.model.state_dict()
        assert states[0].keys() == states[1].keys()
        for name, value in states[0].items():
            assert torch.equal(value, states[1][name]), name
        for a, b in zip(_data(first), _data(second), strict=True):
            assert torch.equal(a, b)
    assert torch.equal(torch.get_rng_state(), state)


def test_shortcuts_are_exercised() -> None:
    """The structured rules are actually taken on many of the default run's models."""
    if not hasattr(ts, "diagonal_plan"):
        pytest.skip("torch_secorder has no diagonal_plan yet")
    methods: list[set[str]] = []
    for seed in FIXED_SEEDS:
        case = build_case(seed)
        with case.active():
            plan, error = _outcome(
                ts.diagonal_plan,
                case.model,
                case.loss_fn,
                case.inputs,
                case.targets,
                params=case.params,
            )
        methods.append(set() if error is not None else {layer.method for layer in plan.layers})
    layer = sum("layer" in m for m in methods)
    gauss_newton = sum("gauss-newton" in m for m in methods)
    assert layer >= len(methods) / 3, f"{layer} of {len(methods)} models used a layer rule"
    assert gauss_newton >= len(methods) / 20, (
        f"{gauss_newton} of {len(methods)} models used the Gauss-Newton rule"
    )
