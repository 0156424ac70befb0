"""The report command on user models: ``--model tests.real.models:make_<arch>``.

Each architecture in train mode (the mode its factory returns), with the data its factory
returns: one batch for the ResNet (BatchNorm in train mode on a one-batch data set) and the
MobileNet, several batches for the ViT and the LSTM (whose loss is imported as
``module:fn``). On the analysis subset, with budgets at which Hutch++ is exact and the
quadrature runs to the end, the report's numbers are compared with the oracle; on all
parameters of the ResNet, its structure and its eigenvalues are compared with
``model_top_eigenvalues`` called as the report calls it.
"""

import json

import pytest
import torch
from torch.testing import assert_close

import torch_secorder as ts
from tests.real import oracle
from tests.real.helpers import checked, own_modules
from tests.real.models import ARCHS, build
from torch_secorder.__main__ import main

DATA = {"resnet": "batch", "vit": "batches", "lstm": "batches", "mobilenet": "batch"}
"""What each ``<arch>_data`` factory returns."""

EPS13 = torch.finfo(torch.float64).eps ** (1 / 3)


def run_report(name, out, capsys, *options):
    loss = "tests.real.models:sequence_loss" if name == "lstm" else "cross-entropy"
    args = [
        "report",
        "--no-progress",
        "--out", str(out),
        "--model", f"tests.real.models:make_{name}",
        "--data", f"tests.real.models:{name}_data",
        "--loss", loss,
        "--per-layer", "all",
        *options,
    ]  # fmt: skip
    status = main(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert (out / "density.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Per layer" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    assert report["plan"]["per_layer"]["chosen"] == "all"
    assert report["setup"]["mode"] == "train"
    assert report["setup"]["dtype"] == "float64"
    return report


@pytest.mark.parametrize("name", ARCHS)
def test_report_against_oracle(name, tmp_path, capsys):
    arch = build(name, "train")
    named = dict(arch.model.named_parameters())
    size = sum(named[n].numel() for n in arch.small)
    report = run_report(
        name,
        tmp_path,
        capsys,
        "--params", *arch.small,
        "--k", "2",
        "--probes", "1",
        "--steps", str(size),
        "--trace-matvecs", str(3 * size),
    )  # fmt: skip
    H = oracle.arch_hessian(name, "train", DATA[name])
    offsets, start = {}, 0
    for n in arch.subset:
        offsets[n] = torch.arange(start, start + named[n].numel())
        start += named[n].numel()

    def block(names):
        idx = torch.cat([offsets[n] for n in names])
        return H[idx][:, idx]

    def assert_top(got, matrix, k):
        expected = torch.linalg.eigvalsh(matrix).flip(0)[:k]
        norm = float(expected.abs().max())
        # the default tol=1e-4 bounds |theta - lambda| relative to max(|theta|, eps^(1/3) ||H||)
        bound = 1e-4 * torch.clamp(expected.abs(), min=EPS13 * norm) + 1e-13 * norm
        assert ((torch.tensor(got, dtype=torch.float64) - expected).abs() <= bound).all()

    whole = block(arch.small)
    assert report["parameters"]["count"] == size
    assert report["top_eigenvalues"]["converged"]
    assert_top(report["top_eigenvalues"]["eigenvalues"], whole, 2)
    # Hutch++ with 3 * size products: the sketch spans every block, the traces are exact
    assert_close(report["trace"]["value"], float(whole.trace()))
    eigenvalues = torch.linalg.eigvalsh(whole)
    scale = float(eigenvalues.abs().max())
    # a full quadrature run: its extreme nodes are the extreme eigenvalues (to sqrt(eps) ||H||)
    assert_close(
        report["spectral_density"]["lowest_node"], float(eigenvalues[0]), rtol=0, atol=1e-7 * scale
    )
    assert_close(
        report["spectral_density"]["highest_node"],
        float(eigenvalues[-1]),
        rtol=0,
        atol=1e-7 * scale,
    )
    owned = own_modules(arch.model, arch.small)
    rows = report["per_layer"]
    assert [row["module"] for row in rows] == list(owned)
    for row in rows:
        assert row["converged"]
        matrix = block(owned[row["module"]])
        assert row["parameters"] == matrix.shape[0]
        assert_close(row["trace"], float(matrix.trace()))
        assert_top([row["top_eigenvalue"]], matrix, 1)


def test_report_resnet_one_batch_all_parameters(tmp_path, capsys):
    """BatchNorm in train mode on a one-batch data set, every parameter (this used to crash)."""
    report = run_report(
        "resnet", tmp_path, capsys, "--k", "2", "--probes", "2", "--steps", "15",
        "--trace-matvecs", "30",
    )  # fmt: skip
    arch = build("resnet", "train")
    names = [n for n, _ in arch.model.named_parameters()]
    assert report["parameters"]["count"] == sum(p.numel() for p in arch.model.parameters())
    owned = own_modules(arch.model, names)
    rows = report["per_layer"]
    assert [row["module"] for row in rows] == list(owned)
    assert all(row["converged"] for row in rows)
    assert [row["parameters"] for row in rows] == [
        sum(dict(arch.model.named_parameters())[n].numel() for n in owned[m]) for m in owned
    ]
    assert report["top_eigenvalues"]["converged"]
    # the report's call, as test_analyses checks it against the oracle's residuals
    expected = checked(
        arch.model,
        ts.model_top_eigenvalues,
        arch.model,
        arch.loss_fn,
        arch.batch,
        k=2,
        generator=torch.Generator().manual_seed(0),
    )
    assert_close(
        torch.tensor(report["top_eigenvalues"]["eigenvalues"], dtype=torch.float64),
        expected.eigenvalues,
    )
