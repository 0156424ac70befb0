"""The report command on user models: ``--model tests.real.models:make_<arch>``.

Each architecture in train mode (the mode its factory returns), with the data its factory
returns: one batch for the ResNet (BatchNorm in train mode on a one-batch data set) and the
MobileNet, several batches for the ViT and the LSTM (whose loss is imported as
``module:fn``). On the analysis subset, with budgets at which every trace is exact and the
quadrature runs to the end, the report's numbers are compared with the oracle; on all
parameters of the ResNet, its structure, its traces' methods and its eigenvalues are compared
with the library's model forms called as the report calls them. A small ReLU CNN in eval mode
(:func:`make_small_cnn`) gets the default report: every trace exact, against the oracle.
"""

import json

import pytest
import torch
from torch import Tensor, nn
from torch.testing import assert_close

import torch_secorder as ts
from tests.real import oracle
from tests.real.helpers import checked, own_modules
from tests.real.models import ARCHS, build
from torch_secorder.__main__ import main

DATA = {"resnet": "batch", "vit": "batches", "lstm": "batches", "mobilenet": "batch"}
"""What each ``<arch>_data`` factory returns."""

EPS13 = torch.finfo(torch.float64).eps ** (1 / 3)


class SmallCNN(nn.Module):
    """Convolution, BatchNorm, in-place ReLU, a residual convolution, pooling, a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 3, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(3)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(3, 3, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(out + self.conv2(out))
        return self.fc(torch.flatten(self.pool(out), 1))


def make_small_cnn() -> nn.Module:
    """The small ReLU CNN in eval mode, float64, BatchNorm off its initial constants."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = SmallCNN().double().eval()
        with torch.no_grad():
            model.bn1.weight.uniform_(0.6, 1.4)
            model.bn1.bias.normal_(0.0, 0.2)
            model.bn1.running_mean.normal_(0.0, 0.2)
            model.bn1.running_var.uniform_(0.5, 1.5)
    return model


def small_cnn_data() -> list[tuple[Tensor, Tensor]]:
    """Two batches of 5 and 3 images of 3x5x5, three classes."""
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in (5, 3)
    ]


def run_report(name, out, capsys, *options, model=None, data=None, mode="train"):
    loss = "tests.real.models:sequence_loss" if name == "lstm" else "cross-entropy"
    args = [
        "report",
        "--no-progress",
        "--out", str(out),
        "--model", model or f"tests.real.models:make_{name}",
        "--data", data or f"tests.real.models:{name}_data",
        "--loss", loss,
        *options,
    ]  # fmt: skip
    status = main(args)
    captured = capsys.readouterr()
    assert status == 0, captured.err
    assert (out / "density.png").read_bytes()[:4] == b"\x89PNG"
    assert "## Per layer" in (out / "report.md").read_text()
    report = json.loads((out / "report.json").read_text())
    assert report["complete"]
    assert report["setup"]["mode"] == mode
    assert report["setup"]["dtype"] == "float64"
    return report, captured.out


@pytest.mark.parametrize("name", ARCHS)
def test_report_against_oracle(name, tmp_path, capsys):
    arch = build(name, "train")
    named = dict(arch.model.named_parameters())
    size = sum(named[n].numel() for n in arch.small)
    report, _ = run_report(
        name,
        tmp_path,
        capsys,
        "--params", *arch.small,
        "--per-layer", "all",
        "--k", "2",
        "--probes", "1",
        "--steps", str(size),
        "--trace-matvecs", str(3 * size),
    )  # fmt: skip
    assert report["plan"]["per_layer"]["chosen"] == "all"
    # the exact diagonal takes at most size products: every trace is a sum of it
    assert report["trace"]["method"] == "exact"
    assert {row["trace_method"] for row in report["per_layer"]} == {"exact"}
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
    # a budget of 3 * size: the exact diagonal (at most size products) or a Hutch++ sketch
    # spanning every block, either way the traces are exact
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
    report, out = run_report(
        "resnet", tmp_path, capsys, "--per-layer", "all", "--k", "2", "--probes", "2",
        "--steps", "15", "--trace-matvecs", "30",
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
    # The exact diagonal takes 1014 products here (BatchNorm in train mode couples the
    # samples; no layer rule), more than the budget of 30: the whole-model trace is Hutch++,
    # and each module's trace is exact where its share of the diagonal is at most 30, as the
    # model form decides per group; the exact ones come from one diagonal of their parameters.
    diagonal = report["plan"]["exact_diagonal"]["products"]
    assert diagonal > 30
    assert f"the exact diagonal would take {diagonal} products" in out
    trace = checked(
        arch.model, ts.model_hessian_trace, arch.model, arch.loss_fn, arch.batch, num_matvecs=30,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    assert (report["trace"]["method"], trace.method) == ("hutch++", "hutch++")
    assert_close(report["trace"]["value"], float(trace.value))
    assert_close(report["trace"]["stderr"], float(trace.stderr))
    layers = checked(
        arch.model, ts.model_hessian_trace, arch.model, arch.loss_fn, arch.batch,
        groups="module", num_matvecs=30,
    )  # fmt: skip
    assert [row["trace_method"] for row in rows] == [layers[row["module"]].method for row in rows]
    assert {row["trace_method"] for row in rows} == {"exact", "hutch++"}
    exact = [row for row in rows if row["trace_method"] == "exact"]
    for row in exact:
        assert row["trace_stderr"] == 0.0
        assert_close(row["trace"], float(layers[row["module"]].value))
    entry = report["plan"]["stages"][3]
    assert entry["method"] == "exact and Hutch++"
    # one diagonal of the exact modules' parameters, planned before the stages, then Hutch++
    products = sum(row["trace_num_matvecs"] for row in rows)
    assert entry["products_used"] == entry["products"] == products


def test_default_report_small_relu_cnn_in_eval_mode_is_exact(tmp_path, capsys):
    """Every trace exact from one diagonal of a few products, the per-layer table complete."""
    report, out = run_report(
        "cnn",
        tmp_path,
        capsys,
        model="tests.real.test_report:make_small_cnn",
        data="tests.real.test_report:small_cnn_data",
        mode="eval",
    )
    model, data = make_small_cnn(), small_cnn_data()
    names = [n for n, _ in model.named_parameters()]
    diagonal = report["plan"]["exact_diagonal"]["products"]
    assert diagonal <= 100  # the Gauss-Newton rule: a few products per class, not one per entry
    plan = out[: out.index("[1/")]
    assert f"  2. trace: exact, {diagonal} products, " in plan
    assert "(the exact diagonal, shared with the per-layer traces)" in plan
    assert "  4. per-layer traces: exact, no further products (4 modules: sums of" in plan
    H = oracle.hessian(model, nn.CrossEntropyLoss(), data, names)
    trace = report["trace"]
    assert (trace["method"], trace["stderr"], trace["num_matvecs"]) == ("exact", 0.0, diagonal)
    assert_close(trace["value"], float(H.trace()))
    owned = own_modules(model, names)
    sizes = {n: p.numel() for n, p in model.named_parameters()}
    offsets, start = {}, 0
    for n in names:
        offsets[n] = torch.arange(start, start + sizes[n])
        start += sizes[n]
    rows = report["per_layer"]
    assert [row["module"] for row in rows] == list(owned) == ["conv1", "bn1", "conv2", "fc"]
    for row in rows:
        idx = torch.cat([offsets[n] for n in owned[row["module"]]])
        block = H[idx][:, idx]
        assert (row["trace_method"], row["trace_stderr"]) == ("exact", 0.0)
        assert_close(row["trace"], float(block.trace()))
        assert row["converged"]
        assert_close(
            row["top_eigenvalue"], float(torch.linalg.eigvalsh(block)[-1]), rtol=1e-4, atol=0
        )
    assert sum(row["trace_num_matvecs"] for row in rows) == diagonal
    statuses = {entry["stage"]: entry["status"] for entry in report["plan"]["stages"]}
    assert statuses == dict.fromkeys(statuses, "done")
    assert report["plan"]["stages"][3]["products_used"] == 0
    markdown = (tmp_path / "report.md").read_text()
    assert f"exact: the sum of the exact diagonal ({diagonal} products)" in markdown
    assert "| fc | Linear | 12 |" in markdown
    for row in rows:  # no standard error: the "±" column is empty
        cells = f"| {row['module']} | {row['type']} | {row['parameters']} | {row['trace']:.6g} |"
        assert f"{cells}  | exact |" in markdown
