import json
import re
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

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(4))
            self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))

        def forward(self, x):
            return self.body(x * self.scale)

    def scaled():
        torch.manual_seed(0)
        return Scaled()

    def deep():
        torch.manual_seed(0)
        layers = [nn.Linear(4, 8)]
        for _ in range(30):
            layers += [nn.Tanh(), nn.Linear(8, 8)]
        return nn.Sequential(*layers, nn.Tanh(), nn.Linear(8, 3))
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
    assert all(row["top_eigenvalue"] is not None for row in report["per_layer"])
    assert report["parameters"]["count"] == 1251
    assert report["complete"]
    assert [entry["status"] for entry in report["plan"]["stages"]] == ["done"] * 4
    # the plan comes first, then a line per stage
    assert out.index("Plan: 1251 parameters in 6 tensors, 3 modules.") < out.index("[1/4]")
    assert out.index("[1/4] top eigenvalues") < out.index("[4/4] per-layer") < out.index("wrote")
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
            r"--params: entry 'nope.\*' matches no parameter of the model; its parameters are: "
            r"0.weight, 0.bias, 2.weight, 2.bias",
        ),
        (["--trace-matvecs", "2"], r"--trace-matvecs must be at least 3 \(Hutch\+\+ needs"),
        (["--per-layer", "trace", "--layer-matvecs", "1"], r"--layer-matvecs must be at least 3"),
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


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if the demo network is trained (the work that used to precede checks)."""
    calls = []

    def train(*args, **kwargs):
        calls.append(1)
        raise AssertionError("the demo trained before the arguments were checked")

    monkeypatch.setattr("torch_secorder._demo.train", train)
    return calls


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--checkpoint", "missing.pt"], r"--checkpoint: no such file missing.pt$"),
        (["--loss", "hinge"], r"--loss must be one of cross-entropy, mse or module:fn"),
        (
            ["--params", "nope.*"],
            r"--params: entry 'nope.\*' matches no parameter of the model; its parameters are: "
            r"0.weight, 0.bias, 2.weight, 2.bias, 4.weight, 4.bias\.",
        ),
        (["--device", "nonsense"], r"--device: unknown device 'nonsense'"),
        (["--device", "meta"], r"--device: meta tensors hold no values"),
        (["--trace-matvecs", "2"], r"--trace-matvecs must be at least 3"),
    ],
)
def test_demo_arguments_are_checked_before_training(args, message, tmp_path, capsys, no_training):
    status, out, err = run(["--out", str(tmp_path), *args], capsys)
    assert status == 2
    assert no_training == []
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert re.search(message, lines[0]), lines[0]
    assert out == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_before_any_work(tmp_path, capsys, no_training):
    status, _, err = run(["--out", str(tmp_path), "--device", "cuda"], capsys)
    assert status == 2
    assert no_training == []
    assert err.strip() == (
        f"torch-secorder report: error: --device: cuda is not available: this torch "
        f"({torch.__version__}) sees no CUDA device; use --device cpu"
    )


def test_out_that_is_a_file_is_refused_before_any_work(tmp_path, capsys, no_training):
    path = tmp_path / "taken"
    path.write_text("")
    status, _, err = run(["--out", str(path)], capsys)
    assert status == 2
    assert no_training == []
    assert err.strip().endswith(f"--out: {path} exists and is not a folder")


def test_checkpoint_gives_the_demo_its_weights_without_training(tmp_path, capsys, no_training):
    from torch_secorder._demo import demo_model

    model = demo_model()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    checkpoint = tmp_path / "demo.pt"
    torch.save(model.state_dict(), checkpoint)
    args = ["--out", str(tmp_path / "out"), "--checkpoint", str(checkpoint), "--per-layer", "none"]
    args += ["--k", "1", "--probes", "1", "--steps", "5", "--trace-matvecs", "3"]
    status, _, err = run(args, capsys)
    assert status == 0, err
    assert no_training == []
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["setup"]["checkpoint"] == str(checkpoint)
    assert "weights from checkpoint" in report["setup"]["model"]


SMALL = ["--k", "2", "--probes", "2", "--steps", "10", "--trace-matvecs", "12"]


def user_args(factories, out, model="model"):
    return ["--out", str(out), "--model", f"{factories}:{model}", "--data", f"{factories}:data"]


def test_failed_stage_keeps_the_finished_ones(tmp_path, factories, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("failed to allocate 7.3 GB\nmore detail")

    monkeypatch.setattr("torch_secorder._report.spectral_density", out_of_memory)
    status, out, err = run([*user_args(factories, tmp_path), *SMALL], capsys)
    assert status == 2
    assert err.strip() == (
        "torch-secorder report: error: stage 'spectral density' failed: RuntimeError: failed to "
        f"allocate 7.3 GB; the finished stages are in {tmp_path / 'report.md'}"
    )
    assert "Traceback" not in err
    assert "[2/4] trace" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["top_eigenvalues"]["eigenvalues"]) == 2
    assert report["trace"]["num_matvecs"] == 12
    assert "spectral_density" not in report
    assert "per_layer" not in report
    assert report["failed"] == {
        "stage": "spectral density",
        "error": "RuntimeError: failed to allocate 7.3 GB",
    }
    statuses = [entry["status"] for entry in report["plan"]["stages"]]
    assert statuses == ["done", "done", "failed", "pending"]
    assert report["num_matvecs"] == report["top_eigenvalues"]["num_matvecs"] + 12
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "**Stage 'spectral density' failed** (RuntimeError: failed to allocate 7.3 GB)" in markdown
    )
    assert "## Top eigenvalues\n\nThick-restart Lanczos" in markdown
    assert "## Per layer\n\nNot computed (pending)." in markdown
    assert not (tmp_path / "density.png").exists()


def test_interrupted_stage_keeps_the_finished_ones(tmp_path, factories, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("torch_secorder._report.per_layer_rows", interrupt)
    status, _, err = run([*user_args(factories, tmp_path), *SMALL, "--per-layer", "all"], capsys)
    assert status == 130
    assert err.strip() == (
        "torch-secorder report: interrupted during stage 'per-layer'; the finished stages are in "
        f"{tmp_path / 'report.md'}"
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"top_eigenvalues", "trace", "spectral_density"} <= set(report)
    statuses = [entry["status"] for entry in report["plan"]["stages"]]
    assert statuses == ["done", "done", "done", "interrupted"]
    assert (tmp_path / "density.png").read_bytes()[:4] == b"\x89PNG"
    assert "**Incomplete**: not finished: per-layer." in (tmp_path / "report.md").read_text()


def test_per_layer_choices(tmp_path, factories, capsys):
    reports = {}
    for choice in ("all", "trace", "none"):
        out = tmp_path / choice
        args = [*user_args(factories, out, "scaled"), *SMALL, "--per-layer", choice]
        status, _, err = run([*args, "--dtype", "float64"], capsys)
        assert status == 0, err
        reports[choice] = json.loads((out / "report.json").read_text())
    rows = reports["all"]["per_layer"]
    # the model's own parameter forms the visible group "(root)"
    assert [(r["module"], r["type"], r["parameters"]) for r in rows] == [
        ("(root)", "Scaled", 4),
        ("body.0", "Linear", 30),
        ("body.2", "Linear", 21),
    ]
    assert all(r["top_eigenvalue"] is not None for r in rows)
    traces = reports["trace"]["per_layer"]
    assert all(r["top_eigenvalue"] is None for r in traces)
    # the same probes: the traces do not depend on whether the eigenvalues ran alongside
    for a, b in zip(rows, traces):
        assert abs(a["trace"] - b["trace"]) <= 1e-12 * max(1.0, abs(a["trace"]))
    assert "per_layer" not in reports["none"]
    assert reports["none"]["plan"]["stages"][3]["status"] == "skipped"
    assert (
        "## Per layer\n\nSkipped (--per-layer none)"
        in (tmp_path / "none" / "report.md").read_text()
    )
    for report in reports.values():  # the whole-model stages are the same whatever the choice
        assert report["trace"] == reports["all"]["trace"]


def test_auto_per_layer_is_a_rule_of_products():
    from torch_secorder._report import make_plan

    def plan(layers, **options):
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
        return make_plan(model, **options)

    # whole-model stages at most 700 + 100 + 400 products; per module at most 100 + 300
    assert plan(6).per_layer == "all"  # 2400 <= 2 x 1200
    assert plan(7).per_layer == "trace"  # 2800 > 2400 >= 700
    assert plan(24).per_layer == "trace"
    assert plan(25).per_layer == "none"  # 2500 > 2400
    assert plan(25).layer_costs == {"all": 25 * 400, "trace": 25 * 100}
    assert plan(25, layer_matvecs=12).per_layer == "trace"
    assert plan(25, per_layer="all").per_layer == "all"
    small = plan(2, trace_matvecs=300)  # a module of 72 parameters: Hutch++ sketches it all
    assert small.layer_costs["trace"] == 2 * 2 * 72


def test_large_model_skips_the_per_layer_table_by_default(tmp_path, factories, capsys):
    # whole-model stages: at most 400 + 100 + 20 products; 32 modules take 32 x 100 for traces
    args = [*user_args(factories, tmp_path, "deep"), "--k", "2", "--probes", "2", "--steps", "10"]
    status, out, err = run(args, capsys)
    assert status == 0, err
    assert "4. per-layer: skipped (--per-layer auto); for 32 modules it would take" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plan"]["per_layer"]["chosen"] == "none"
    assert "per_layer" not in report
