"""Every argument error of the core functions: its type, its exact message, raised early.

Each bad call goes through a closure (or loss function) that counts its calls: argument errors
must be raised before the loss is ever evaluated.
"""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from tests.core.helpers import Recorder
from torch_secorder import (
    batched_hvp,
    hessian_block,
    hessian_blocks,
    hessian_diagonal,
    hessian_matrix,
    hvp,
    model_hessian_diagonal,
    model_hessian_matrix,
    model_hvp,
)

F64 = torch.float64


def _problem():
    """x (2,), y (3,) in float64; f = sum(x^3) + sum(y^3); a model with named parameters."""
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    y = torch.tensor([1.0, 2.0, 3.0], dtype=F64, requires_grad=True)
    model = nn.Sequential(nn.Linear(2, 3), nn.Tanh(), nn.Linear(3, 1)).to(F64)
    return SimpleNamespace(
        x=x,
        y=y,
        params=[x, y],
        func=Recorder(lambda: (x**3).sum() + (y**3).sum()),
        v=[torch.ones(2, dtype=F64), torch.ones(3, dtype=F64)],
        model=model,
        loss_fn=Recorder(lambda out, target: ((out - target) ** 2).mean()),
        inputs=torch.ones(4, 2, dtype=F64),
        targets=torch.zeros(4, 1, dtype=F64),
        mv=[torch.ones(s, dtype=F64) for s in [(3, 2), (3,), (1, 3), (1,)]],
    )


# The closure forms, called with valid arguments except ``func`` and ``params``.
CLOSURE_FORMS = {
    "hvp": lambda pr, func, params: hvp(func, params, pr.v),
    "batched_hvp": lambda pr, func, params: batched_hvp(func, params, torch.ones(2, 5, dtype=F64)),
    "hessian_diagonal": lambda pr, func, params: hessian_diagonal(func, params),
    "hessian_blocks": lambda pr, func, params: hessian_blocks(func, params),
    "hessian_matrix": lambda pr, func, params: hessian_matrix(func, params),
    "hessian_block": lambda pr, func, params: hessian_block(func, params, [pr.y]),
}

PARAMS_ERRORS = [
    (
        lambda pr: pr.x,
        TypeError,
        r"{arg} must be an iterable of tensors; got a single Tensor\. Wrap it in a list: "
        r"\[param\]\.$",
    ),
    (lambda pr: 5, TypeError, r"{arg} must be an iterable of tensors; got int\.$"),
    (lambda pr: [], ValueError, r"{arg} is empty; expected at least one tensor\.$"),
    (lambda pr: [pr.x, 1.0], TypeError, r"{arg}\[1\] must be a Tensor; got float\.$"),
    (
        lambda pr: [pr.x, torch.ones(2, dtype=torch.int64)],
        ValueError,
        r"{arg}\[1\] has dtype torch\.int64; expected a floating-point tensor\.$",
    ),
    (
        lambda pr: [pr.x, pr.x],
        ValueError,
        r"{arg}\[1\] is the same tensor as {arg}\[0\]; pass each parameter once\.$",
    ),
]


def _check(call, recorder, error, match):
    with pytest.raises(error, match=match):
        call()
    assert recorder.calls == 0, "the loss was evaluated before the argument error"


@pytest.mark.parametrize("fname", list(CLOSURE_FORMS))
def test_func_not_callable(fname):
    pr = _problem()
    with pytest.raises(TypeError, match=rf"^{fname}: func must be callable; got int\.$"):
        CLOSURE_FORMS[fname](pr, 3, pr.params)


@pytest.mark.parametrize(("make", "error", "message"), PARAMS_ERRORS)
@pytest.mark.parametrize("fname", list(CLOSURE_FORMS))
def test_params_errors(fname, make, error, message):
    pr = _problem()
    arg = "row_params" if fname == "hessian_block" else "params"
    match = f"^{fname}: " + message.format(arg=arg)
    _check(lambda: CLOSURE_FORMS[fname](pr, pr.func, make(pr)), pr.func, error, match)


@pytest.mark.parametrize(("make", "error", "message"), PARAMS_ERRORS)
def test_col_params_errors(make, error, message):
    pr = _problem()
    match = "^hessian_block: " + message.format(arg="col_params")
    _check(lambda: hessian_block(pr.func, [pr.y], make(pr)), pr.func, error, match)


# ----------------------------------------------------------------------------- vectors

VECTOR_ERRORS = [
    (
        lambda pr: {"x": 1},
        TypeError,
        r"v must be a Tensor of shape \(5,\) or a list of tensors like params; got dict\.$",
    ),
    (
        lambda pr: pr.v[:1],
        ValueError,
        r"v has 1 tensors but there are 2 params; pass one tensor per parameter or a flat "
        r"tensor of shape \(5,\)\.$",
    ),
    (lambda pr: [pr.v[0], 1.0], TypeError, r"v\[1\] must be a Tensor; got float\.$"),
    (
        lambda pr: [pr.v[0], torch.ones(4, dtype=F64)],
        ValueError,
        r"v\[1\] has shape \(4,\) but params\[1\] has shape \(3,\); pass one tensor per "
        r"parameter with matching shapes or a flat tensor of length 5\.$",
    ),
    (
        lambda pr: [torch.ones(2), pr.v[1]],
        ValueError,
        r"v\[0\] has dtype torch\.float32 but params\[0\] has dtype torch\.float64; expected "
        r"matching dtypes\.$",
    ),
    (
        lambda pr: [torch.ones(2, dtype=F64, device="meta"), pr.v[1]],
        ValueError,
        r"v\[0\] is on meta but params\[0\] is on cpu; expected matching devices\.$",
    ),
    (
        lambda pr: torch.ones(4, dtype=F64),
        ValueError,
        r"v has shape \(4,\); expected a flat tensor of shape \(5,\) or a list with one "
        r"tensor per parameter\.$",
    ),
    (lambda pr: torch.ones(1, 5, dtype=F64), ValueError, r"v has shape \(1, 5\); expected"),
    (
        lambda pr: torch.ones(5),
        ValueError,
        r"v has dtype torch\.float32 but params\[0\] has dtype torch\.float64; expected "
        r"matching dtypes\.$",
    ),
]


@pytest.mark.parametrize(("make", "error", "message"), VECTOR_ERRORS)
@pytest.mark.parametrize("fname", ["hvp", "hessian_diagonal"])
def test_vector_errors(fname, make, error, message):
    pr = _problem()
    function = {"hvp": hvp, "hessian_diagonal": hessian_diagonal}[fname]
    _check(lambda: function(pr.func, pr.params, make(pr)), pr.func, error, f"^{fname}: {message}")


def test_flat_vector_needs_one_dtype():
    pr = _problem()
    z = torch.ones(2, requires_grad=True)
    _check(
        lambda: hvp(pr.func, [pr.x, z], torch.ones(4, dtype=F64)),
        pr.func,
        ValueError,
        r"^hvp: a flat v needs params of one dtype and device, but params\[0\] is torch\.float64 "
        r"on cpu and params\[1\] is torch\.float32 on cpu; pass v as a list like params "
        r"instead\.$",
    )


@pytest.mark.parametrize(
    ("make", "error", "message"),
    [
        (
            lambda pr: [torch.ones(2, dtype=F64), torch.ones(2, 3, dtype=F64)],
            ValueError,
            r"vs\[0\] has shape \(2,\) but params\[0\] has shape \(2,\); expected "
            r"\(k, \*\(2,\)\)\.$",
        ),
        (
            lambda pr: [torch.ones(2, 2, dtype=F64), torch.ones(3, 3, dtype=F64)],
            ValueError,
            r"vs\[1\] stacks 3 vectors but vs\[0\] stacks 2; every tensor needs the same "
            r"leading dimension k\.$",
        ),
        (
            lambda pr: torch.ones(5, dtype=F64),
            ValueError,
            r"vs has shape \(5,\); expected a flat tensor of shape \(k, 5\) or a list with one "
            r"tensor per parameter\.$",
        ),
        (
            lambda pr: "vs",
            TypeError,
            r"vs must be a Tensor of shape \(k, 5\) or a list of tensors like params; got str\.$",
        ),
    ],
)
def test_batched_vector_errors(make, error, message):
    pr = _problem()
    _check(
        lambda: batched_hvp(pr.func, pr.params, make(pr)),
        pr.func,
        error,
        f"^batched_hvp: {message}",
    )


# ----------------------------------------------------------------------------- options


OPTION_CALLS = {
    "hvp": lambda pr, **kw: hvp(pr.func, pr.params, pr.v, **kw),
    "batched_hvp": lambda pr, **kw: batched_hvp(
        pr.func, pr.params, torch.ones(2, 5, dtype=F64), **kw
    ),
    "hessian_diagonal": lambda pr, **kw: hessian_diagonal(pr.func, pr.params, **kw),
    "hessian_block": lambda pr, **kw: hessian_block(pr.func, [pr.x], [pr.y], **kw),
    "hessian_blocks": lambda pr, **kw: hessian_blocks(pr.func, pr.params, **kw),
    "hessian_matrix": lambda pr, **kw: hessian_matrix(pr.func, pr.params, **kw),
    "model_hvp": lambda pr, **kw: model_hvp(
        pr.model, pr.loss_fn, pr.inputs, pr.targets, pr.mv, **kw
    ),
    "model_hessian_diagonal": lambda pr, **kw: model_hessian_diagonal(
        pr.model, pr.loss_fn, pr.inputs, pr.targets, **kw
    ),
    "model_hessian_matrix": lambda pr, **kw: model_hessian_matrix(
        pr.model, pr.loss_fn, pr.inputs, pr.targets, **kw
    ),
}

OPTIONS = {
    "create_graph": ["hvp", "hessian_diagonal", "model_hvp", "model_hessian_diagonal"],
    "strict": ["hvp", "batched_hvp", "hessian_diagonal", "model_hvp", "model_hessian_diagonal"],
    "chunk_size": [
        "batched_hvp",
        "hessian_diagonal",
        "hessian_block",
        "hessian_blocks",
        "hessian_matrix",
        "model_hessian_diagonal",
        "model_hessian_matrix",
    ],
    "max_bytes": ["hessian_block", "hessian_blocks", "hessian_matrix", "model_hessian_matrix"],
}

OPTION_ERRORS = {
    "create_graph": [(1, TypeError, r"create_graph must be a bool; got int\.$")],
    "strict": [("yes", TypeError, r"strict must be a bool; got str\.$")],
    "chunk_size": [
        (0, ValueError, r"chunk_size must be a positive int; got 0\.$"),
        (-3, ValueError, r"chunk_size must be a positive int; got -3\.$"),
        (2.0, TypeError, r"chunk_size must be None or a positive int; got float\.$"),
        (True, TypeError, r"chunk_size must be None or a positive int; got bool\.$"),
    ],
    "max_bytes": [
        ("1GB", TypeError, r"max_bytes must be a number; got str\.$"),
        (0, ValueError, r"max_bytes must be positive; got 0\.$"),
        (-1.5, ValueError, r"max_bytes must be positive; got -1\.5\.$"),
        (float("nan"), ValueError, r"max_bytes must be positive; got nan\.$"),
    ],
}


@pytest.mark.parametrize(
    ("fname", "option", "value", "error", "message"),
    [
        pytest.param(fname, option, value, error, message, id=f"{fname}-{option}={value!r}")
        for option, fnames in OPTIONS.items()
        for fname in fnames
        for value, error, message in OPTION_ERRORS[option]
    ],
)
def test_option_errors(fname, option, value, error, message):
    pr = _problem()
    recorder = pr.loss_fn if fname.startswith("model_") else pr.func
    _check(
        lambda: OPTION_CALLS[fname](pr, **{option: value}), recorder, error, f"^{fname}: {message}"
    )


NUMPY_VALUES = {"chunk_size": 2, "max_bytes": 2**30}


@pytest.mark.parametrize(
    ("fname", "option"),
    [
        pytest.param(fname, option, id=f"{fname}-{option}")
        for option in NUMPY_VALUES
        for fname in OPTIONS[option]
    ],
)
def test_numpy_scalars_work_as_python_numbers(fname, option):
    np = pytest.importorskip("numpy")
    value = NUMPY_VALUES[option]
    torch.manual_seed(0)  # (the model's weights)
    expected = OPTION_CALLS[fname](_problem(), **{option: value})
    torch.manual_seed(0)
    result = OPTION_CALLS[fname](_problem(), **{option: np.int64(value)})
    for r, e in zip(result, expected) if isinstance(result, list) else [(result, expected)]:
        assert torch.equal(r, e)


# ----------------------------------------------------------------------------- model forms

MODEL_FORMS = ["model_hvp", "model_hessian_diagonal", "model_hessian_matrix"]


def _model_call(fname, pr, model=None, loss_fn=None, inputs=None, **kw):
    call = {
        "model_hvp": lambda *a, **k: model_hvp(*a, pr.mv, **k),
        "model_hessian_diagonal": model_hessian_diagonal,
        "model_hessian_matrix": model_hessian_matrix,
    }[fname]
    return call(
        pr.model if model is None else model,
        pr.loss_fn if loss_fn is None else loss_fn,
        pr.inputs if inputs is None else inputs,
        pr.targets,
        **kw,
    )


@pytest.mark.parametrize("fname", MODEL_FORMS)
def test_model_form_errors(fname):
    pr = _problem()
    cases = [
        (
            {"model": pr.func},
            TypeError,
            r"model must be a torch\.nn\.Module; got Recorder\.$",
        ),
        ({"loss_fn": 3}, TypeError, r"loss_fn must be callable; got int\.$"),
        (
            {"inputs": 3},
            TypeError,
            r"inputs must be a Tensor, a tuple of model arguments or a dict of keyword "
            r"arguments; got int\.$",
        ),
        (
            {"params": "nope"},
            ValueError,
            r"params entry 'nope' matches no parameter of the model; its parameters are: "
            r"0\.weight, 0\.bias, 2\.weight, 2\.bias\.$",
        ),
        (
            {"params": 3},
            TypeError,
            r"params must be None, a name or glob pattern, or a list of them; got int\.$",
        ),
        ({"params": []}, ValueError, r"params is an empty list; expected names or patterns\.$"),
    ]
    for kwargs, error, message in cases:
        call = lambda kwargs=kwargs: _model_call(fname, pr, **kwargs)  # noqa: E731
        _check(call, pr.loss_fn, error, f"^{fname}: {message}")


def test_model_form_names_the_parameter():
    pr = _problem()
    v = [pr.mv[0], torch.ones(1, dtype=F64), *pr.mv[2:]]
    _check(
        lambda: model_hvp(pr.model, pr.loss_fn, pr.inputs, pr.targets, v),
        pr.loss_fn,
        ValueError,
        r"^model_hvp: v\[1\] has shape \(1,\) but params\[1\] \('0\.bias'\) has shape \(3,\); ",
    )


def test_model_form_without_trainable_parameters():
    pr = _problem()
    pr.model.requires_grad_(False)
    _check(
        lambda: model_hessian_matrix(pr.model, pr.loss_fn, pr.inputs, pr.targets),
        pr.loss_fn,
        ValueError,
        r"^model_hessian_matrix: the model has no parameters with requires_grad=True; "
        r"select parameters by name with params=\.$",
    )


# ----------------------------------------------------------------------------- dense layouts


def test_dense_results_need_one_dtype():
    pr = _problem()
    z = torch.ones(2, requires_grad=True)
    _check(
        lambda: hessian_matrix(pr.func, [pr.x, z]),
        pr.func,
        ValueError,
        r"^hessian_matrix: a dense Hessian needs params of one dtype and device, but params\[0\] "
        r"is torch\.float64 on cpu and params\[1\] is torch\.float32 on cpu; cast them to one "
        r"dtype and device, or use hessian_blocks\.$",
    )
    _check(
        lambda: hessian_block(pr.func, [pr.x], [pr.y, z]),
        pr.func,
        ValueError,
        r"^hessian_block: a dense block needs params of one dtype and device, but "
        r"row_params\[0\] is torch\.float64 on cpu and col_params\[1\] is torch\.float32 on "
        r"cpu; cast them to one dtype and device\.$",
    )


def test_model_matrix_names_the_parameter_of_another_dtype():
    pr = _problem()
    pr.model[2].bias.data = pr.model[2].bias.data.float()
    _check(
        lambda: model_hessian_matrix(pr.model, pr.loss_fn, pr.inputs, pr.targets),
        pr.loss_fn,
        ValueError,
        r"^model_hessian_matrix: a dense Hessian needs params of one dtype and device, but "
        r"params\[0\] \('0\.weight'\) is torch\.float64 on cpu and params\[3\] \('2\.bias'\) is "
        r"torch\.float32 on cpu; ",
    )


@pytest.mark.parametrize(
    ("fname", "call", "message"),
    [
        (
            "hessian_block",
            lambda f, x: hessian_block(f, [x], max_bytes=100),
            r"the 20 x 20 block \(float64\) needs 3\.1 KiB, more than max_bytes=100 B; use "
            r"hvp, batched_hvp or HessianOperator, or a smaller selection\.$",
        ),
        (
            "hessian_blocks",
            lambda f, x: hessian_blocks(f, [x, x[:1].detach().requires_grad_()], max_bytes=100),
            r"a list of 2 blocks \(float64\) needs 3\.1 KiB, more than max_bytes=100 B; ",
        ),
    ],
)
def test_block_size_guards(fname, call, message):
    x = torch.ones(20, dtype=F64, requires_grad=True)
    func = Recorder(lambda: (x**3).sum())
    _check(lambda: call(func, x), func, ValueError, f"^{fname}: {message}")


# ----------------------------------------------------------------------------- the loss


@pytest.mark.parametrize(
    ("loss", "error", "message"),
    [
        (lambda x: 1.0, TypeError, r"func must return a Tensor; got float\.$"),
        (
            lambda x: x**2,
            ValueError,
            r"func must return a scalar loss; got a tensor of shape \(2,\)\. Reduce it, e\.g\. "
            r"with \.mean\(\) or \.sum\(\)\.$",
        ),
        (
            lambda x: torch.tensor(1),
            ValueError,
            r"func must return a floating-point loss; got torch\.int64\.$",
        ),
    ],
)
@pytest.mark.parametrize("fname", list(CLOSURE_FORMS))
def test_loss_errors(fname, loss, error, message):
    pr = _problem()
    with pytest.raises(error, match=f"^{fname}: {message}"):
        CLOSURE_FORMS[fname](pr, lambda: loss(pr.x), pr.params)


def test_one_element_loss_is_a_scalar():
    x = torch.tensor([1.0, 2.0], dtype=F64, requires_grad=True)
    result = hvp(lambda: (x**3).sum().reshape(1, 1), [x], torch.ones(2, dtype=F64))
    torch.testing.assert_close(result, 6 * x.detach())


@pytest.mark.parametrize("fname", MODEL_FORMS)
def test_inputs_of_another_dtype_than_the_parameters_are_named(fname):
    pr = _problem()
    with pytest.raises(
        ValueError,
        match=rf"^{fname}: the forward pass raised 'mat1 and mat2 must have the same dtype.*': "
        r"the parameters are torch\.float64; are the inputs \(or another tensor it uses\) of "
        r"another dtype\? Cast them, e\.g\. inputs\.to\(torch\.float64\), or the model to "
        r"theirs\.$",
    ) as caught:
        _model_call(fname, pr, inputs=pr.inputs.float())
    assert isinstance(caught.value.__cause__, RuntimeError)
    assert not any(p.grad is not None for p in pr.model.parameters())


def test_other_errors_of_the_forward_pass_are_raised_as_they_are():
    pr = _problem()
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        model_hvp(pr.model, pr.loss_fn, torch.ones(4, 3, dtype=F64), pr.targets, pr.mv)


@pytest.mark.parametrize(
    ("loss", "error", "message"),
    [
        (lambda out: 1.0, TypeError, r"loss_fn must return a Tensor; got float\.$"),
        (lambda out: out, ValueError, r"loss_fn must return a scalar loss; got a tensor of shape"),
        (
            lambda out: torch.tensor(1),
            ValueError,
            r"loss_fn must return a floating-point loss; got torch\.int64\.$",
        ),
    ],
)
@pytest.mark.parametrize("fname", MODEL_FORMS)
def test_model_form_loss_errors_name_loss_fn(fname, loss, error, message):
    pr = _problem()
    with pytest.raises(error, match=f"^{fname}: {message}"):
        _model_call(fname, pr, loss_fn=lambda out, target: loss(out))
