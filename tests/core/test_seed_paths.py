"""The module path and examples of the torch-secorder 0.0.1 documentation, run verbatim."""

import contextlib
import io
import textwrap
import types

import torch_secorder
import torch_secorder.core
from torch_secorder.core import diagonal

QUADRATIC = """
import torch
from torch_secorder.core.hessian_diagonal import hessian_diagonal

# Create a simple quadratic function: f(x) = x^T A x
A = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
x = torch.tensor([1.0, 2.0], requires_grad=True)

def quadratic():
    return x @ A @ x

# Compute the diagonal of the Hessian
diag = hessian_diagonal(quadratic, [x])
print(diag[0])  # Should print tensor([4., 6.]) (diagonal of 2A)
"""

MODEL = """
import torch
import torch.nn as nn
from torch_secorder.core.hessian_diagonal import model_hessian_diagonal

# Create a simple neural network
model = nn.Linear(10, 1)
x = torch.randn(5, 10)
y = torch.randn(5, 1)

# Compute the diagonal of the Hessian for the MSE loss
diag = model_hessian_diagonal(model, nn.functional.mse_loss, x, y)

# diag[0] contains the diagonal for the weight matrix
# diag[1] contains the diagonal for the bias vector
print(f"Weight diagonal shape: {diag[0].shape}")
print(f"Bias diagonal shape: {diag[1].shape}")
"""


def _run(source: str) -> str:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(textwrap.dedent(source), "<documentation>", "exec"), {})  # noqa: S102
    return out.getvalue()


def test_quadratic_example_prints_the_diagonal_of_2a():
    assert _run(QUADRATIC) == "tensor([4., 6.])\n"


def test_model_example_prints_the_parameter_shapes():
    printed = _run(MODEL)
    assert (
        printed
        == "Weight diagonal shape: torch.Size([1, 10])\nBias diagonal shape: torch.Size([1])\n"
    )


def test_the_documented_path_gives_the_functions_and_leaves_package_names_functions():
    from torch_secorder.core.hessian_diagonal import hessian_diagonal, model_hessian_diagonal

    assert hessian_diagonal is diagonal.hessian_diagonal
    assert model_hessian_diagonal is diagonal.model_hessian_diagonal
    assert torch_secorder.core.hessian_diagonal is diagonal.hessian_diagonal
    assert torch_secorder.hessian_diagonal is diagonal.hessian_diagonal
    assert not isinstance(torch_secorder.core.hessian_diagonal, types.ModuleType)
