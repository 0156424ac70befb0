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
