import json
import textwrap

import pytest
import torch
from torch import nn

from torch_secorder import hessian_matrix
from torch_secorder.__main__ import main

FACTORIES = textwrap.dedent(
    """
    import torch
    from torch import nn

    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

    def data():
        g = torch.Generator().manual_seed(1)
        x = torch.randn(40, 4, generator=g)
        y = torch.randint(0, 3, (40,), generator=g)
        return torch.utils.data.TensorDataset(x, y)

    def one_batch():
        g = torch.Generator().manual_seed(1)
        return torch.randn(12, 4, generator=g), torch.randn(12, 3, generator=g)

    def strings():
        return [("not", "tensors")]

    def not_a_model():
        return 3

    def sum_loss(out, y):
        return nn.functional.cross_entropy(out, y)
    """
)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    (tmp_path / "report_factories.py").write_text(FACTORIES)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "report_factories"


def run(args, capsys):
    status = main(["report", "--no-progress", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_default_demo_report(tmp_path, capsys):
    status, out, err = run(
        ["--out", str(tmp_path), "--k", "3", "--probes", "2", "--steps", "40"], capsys
    )
    assert status == 0, err
    assert "wrote" in out
    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    assert (tmp_path / "density.png").read_bytes()[:4] == b"\x89PNG"
    eig = report["top_eigenvalues"]
    assert len(eig["eigenvalues"]) == 3
    assert eig["converged"]
    assert eig["eigenvalues"] == sorted(eig["eigenvalues"], reverse=True)
    assert [row["module"] for row in report["per_layer"]] == ["0", "2", "4"]
    assert report["parameters"]["count"] == 1251
    assert "## Top eigenvalues" in markdown
    assert "## Per layer" in markdown
    assert "![Spectral density](density.png)" in markdown
    # the demo's top eigenvalue against the dense Hessian of the same trained network
    from torch_secorder._demo import demo_model, spirals, train

    x, y = spirals()
    model = demo_model()
    train(model, x, y)
    H = hessian_matrix(lambda: nn.functional.cross_entropy(model(x), y), model.parameters())
    top = torch.linalg.eigvalsh(H)[-3:].flip(0)
    torch.testing.assert_close(
        torch.tensor(eig["eigenvalues"], dtype=torch.float64), top, rtol=1e-4, atol=0
    )
    trace = report["trace"]
    assert abs(trace["value"] - H.trace().item()) < 5 * trace["stderr"]


def test_user_model_and_data(tmp_path, factories, capsys):
    checkpoint = tmp_path / "weights.pt"
    torch.manual_seed(5)
    trained = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    torch.save({"state_dict": trained.state_dict()}, checkpoint)
    args = [
        "--out", str(tmp_path / "out"),
        "--model", f"{factories}:model",
        "--data", f"{factories}:data",
        "--checkpoint", str(checkpoint),
        "--loss", f"{factories}:sum_loss",
        "--params", "0.*",
        "--dtype", "float64",
        "--batch-size", "16",
        "--k", "2", "--probes", "2", "--steps", "20", "--trace-matvecs", "30",
    ]  # fmt: skip
    status, _, err = run(args, capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["parameters"]["count"] == 30
    assert report["setup"]["dtype"] == "float64"
    assert [row["module"] for row in report["per_layer"]] == ["0"]
    # against the dense Hessian of the checkpoint's weights over the 40 samples
    from report_factories import data

    x, y = data().tensors
    model = trained.double()
    H = hessian_matrix(
        lambda: nn.functional.cross_entropy(model(x.double()), y), model[0].parameters()
    )
    expected = torch.linalg.eigvalsh(H)[-2:].flip(0)
    got = torch.tensor(report["top_eigenvalues"]["eigenvalues"], dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=0)


def test_one_batch_mse(tmp_path, factories, capsys):
    args = [
        "--out", str(tmp_path), "--model", f"{factories}:model", "--data", f"{factories}:one_batch",
        "--loss", "mse", "--k", "1", "--probes", "1", "--steps", "10", "--trace-matvecs", "10",
    ]  # fmt: skip
    status, _, err = run(args, capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "report.json").read_text())["setup"]["dtype"] == "float32"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model", "no_such_module_xyz:f", "--data", "x:y"],
            r"--model: cannot import 'no_such_module_xyz'",
        ),
        (
            ["--model", "{f}:nothing", "--data", "{f}:data"],
            r"--model: module 'report_factories' has no 'nothing'",
        ),
        (["--model", "{f}", "--data", "{f}:data"], r"--model must look like module:attribute"),
        (
            ["--model", "{f}:not_a_model", "--data", "{f}:data"],
            r"--model: .* returned a int, not a Module",
        ),
        (
            ["--model", "{f}:model", "--data", "{f}:strings"],
            r"--data: batches must be \(inputs, targets\) pairs of tensors",
        ),
        (["--model", "{f}:model"], r"--model and --data go together"),
        (["--checkpoint", "missing.pt"], r"--checkpoint: no such file missing.pt"),
        (["--loss", "hinge"], r"--loss must be one of cross-entropy, mse or module:fn"),
        (["--k", "0"], r"--k must be positive"),
        (["--device", "nonsense"], r"--device: unknown device 'nonsense'"),
        (
            ["--model", "{f}:model", "--data", "{f}:data", "--params", "nope.*"],
            r"params entry 'nope.\*' matches no parameter",
        ),
    ],
)
def test_bad_arguments_one_line_error(args, message, factories, tmp_path, capsys):
    args = [a.replace("{f}", factories) for a in args]
    status, out, err = run(["--out", str(tmp_path), *args], capsys)
    assert status == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("torch-secorder report: error: ")
    assert __import__("re").search(message, lines[0]), lines[0]
    assert "Traceback" not in err


def test_mismatched_checkpoint(tmp_path, factories, capsys):
    checkpoint = tmp_path / "other.pt"
    torch.save(nn.Linear(2, 2).state_dict(), checkpoint)
    args = [
        "--out",
        str(tmp_path),
        "--model",
        f"{factories}:model",
        "--data",
        f"{factories}:data",
        "--checkpoint",
        str(checkpoint),
    ]
    status, _, err = run(args, capsys)
    assert status == 2
    assert "--checkpoint: " in err
    assert "does not match the model" in err
    assert len(err.strip().splitlines()) == 1


def test_python_dash_m_entry_point(tmp_path):
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "torch_secorder", "report", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0
    assert "--checkpoint" in result.stdout
