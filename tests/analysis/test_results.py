import dataclasses

import pytest
import torch

import torch_secorder as ts
import torch_secorder.analysis as analysis

FIELDS = {
    "TraceEstimate": ["value", "stderr", "num_matvecs"],
    "EigenResult": ["eigenvalues", "eigenvectors", "residuals", "converged", "num_matvecs"],
    "DensityResult": ["grid", "density", "nodes", "weights", "num_matvecs"],
    "DiagonalEstimate": ["diagonal", "stderr", "num_matvecs"],
}


@pytest.mark.parametrize("name", FIELDS)
def test_result_types_are_frozen_with_the_named_fields_first(name):
    cls = getattr(ts, name)
    assert cls is getattr(analysis, name)
    assert dataclasses.is_dataclass(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    assert names[: len(FIELDS[name])] == FIELDS[name]
    values = {f: torch.zeros(()) for f in names}
    instance = cls(**values)
    with pytest.raises(dataclasses.FrozenInstanceError):
        instance.num_matvecs = 3


def test_public_names_are_exported():
    for name in analysis.__all__:
        assert getattr(ts, name) is getattr(analysis, name)
        assert name in ts.__all__


def test_a_results_repr_is_one_line_with_large_tensors_by_shape():
    result = ts.EigenResult(
        torch.tensor([3.0, 1.0]),
        [torch.zeros(2, 500, 3, dtype=torch.float64), torch.ones(2, 3)],
        torch.tensor([1e-6, 2e-6]),
        True,
        41,
    )
    text = repr(result)
    assert "\n" not in text
    assert text == (
        "EigenResult(eigenvalues=tensor([3., 1.]), eigenvectors=[<tensor of shape (2, 500, 3), "
        "float64>, tensor([[1., 1., 1.], [1., 1., 1.]])], residuals=tensor([1.0000e-06, "
        "2.0000e-06]), converged=True, num_matvecs=41)"
    )
    density = ts.DensityResult(
        torch.zeros(1000), torch.zeros(1000), torch.zeros(1, 3), torch.ones(1, 3), 3, 0.5
    )
    assert repr(density).startswith("DensityResult(grid=<tensor of shape (1000,), float32>, ")
