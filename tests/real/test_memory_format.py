"""Convolutional models in ``channels_last`` memory format, as users run them for speed.

The Hessian does not depend on how the weights are laid out in memory: the library's results
on a ``channels_last`` copy are the oracle's of the original model, flattened row-major in the
logical order of each parameter's shape.
"""

import copy
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.testing import assert_close

import torch_secorder as ts
from tests.real import oracle
from tests.real.helpers import checked
from tests.real.models import MODES, build


@pytest.mark.parametrize("mode", MODES)
def test_resnet_channels_last(mode):
    arch = build("resnet", mode)
    model = copy.deepcopy(arch.model).to(memory_format=torch.channels_last)
    assert dict(model.named_parameters())["layer1.0.conv2.weight"].is_contiguous(
        memory_format=torch.channels_last
    )
    x, y = arch.batch
    x = x.to(memory_format=torch.channels_last)
    H = oracle.arch_hessian("resnet", mode, "batch")
    matrix = checked(model, ts.model_hessian_matrix, model, arch.loss_fn, x, y, params=arch.subset)
    assert_close(matrix, H)
    diagonal = checked(
        model, ts.model_hessian_diagonal, model, arch.loss_fn, x, y, params=arch.subset
    )
    assert_close(oracle.flat(diagonal), H.diagonal())
    v = oracle.random_like(model, arch.subset, seed=9)
    product = checked(model, ts.model_hvp, model, arch.loss_fn, x, y, v, params=arch.subset)
    assert_close(oracle.flat(product), H @ oracle.flat(v))


MOBILENET_CHANNELS_LAST = textwrap.dedent(
    """
    import copy
    import torch
    import torch_secorder as ts
    from tests.real import oracle
    from tests.real.models import build

    arch = build("mobilenet", "train")
    model = copy.deepcopy(arch.model).to(memory_format=torch.channels_last)
    x, y = arch.batch
    names = ["block.dw.1.weight", "block.dw.1.bias"]
    H = oracle.hessian(arch.model, arch.loss_fn, [arch.batch], names)
    diagonal = ts.model_hessian_diagonal(model, arch.loss_fn, x, y, params=names)
    torch.testing.assert_close(oracle.flat(diagonal), H.diagonal())
    """
)


class Crashed(Exception):
    """The subprocess died of a segmentation fault."""


def test_mobilenet_channels_last_groupnorm_diagonal():
    """In a subprocess: PyTorch 2.13's CPU double backward of GroupNorm with respect to its
    bias crashes the interpreter on channels_last inputs, which the library routes around."""
    root = Path(__file__).resolve().parents[2]
    result = subprocess.run(
        [sys.executable, "-c", MOBILENET_CHANNELS_LAST],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    if result.returncode == -signal.SIGSEGV:
        raise Crashed(result.stderr[-2000:])
    assert result.returncode == 0, result.stderr[-2000:]
