import importlib
import json
import re
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import torch_secorder as ts
from tests import reference as ref
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

    def shuffled():
        return torch.utils.data.DataLoader(data(), batch_size=16, shuffle=True)

    def not_a_model():
        return 3

    def wide():
        return nn.Linear(5, 3)  # (the data has 4 features)

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

    class Raw(nn.Module):
        # a weight used directly (no layer rule: one product per element), then a Linear

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(0.5 * torch.randn(4, 40))
            self.head = nn.Linear(40, 3)

        def forward(self, x):
            return self.head(torch.tanh(x @ self.weight))

    def raw():
        torch.manual_seed(0)
        return Raw()

    class Twice(nn.Module):
        # one Tanh applied twice: its output is no single tensor

        def __init__(self):
            super().__init__()
            self.first, self.act, self.head = nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)

        def forward(self, x):
            return self.head(self.act(self.act(self.first(x))))

    def twice():
        torch.manual_seed(0)
        return Twice()
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
    rows = report["per_layer"]
    assert [row["module"] for row in rows] == ["0", "2", "4"]
    assert all(row["top_eigenvalue"] is not None for row in rows)
    assert report["parameters"]["count"] == 1251
    assert report["complete"]
    assert [entry["status"] for entry in report["plan"]["stages"]] == ["done"] * 5
    # the plan comes first, with each stage's method, then a line per stage
    plan = out[: out.index("[1/5]")]
    assert "Plan: 1251 parameters in 6 tensors, 3 modules." in plan
    diagonal = report["plan"]["exact_diagonal"]["products"]
    assert diagonal <= 100  # the tanh MLP's layers are read off their outputs' products
    assert f"  2. trace: exact, {diagonal} products, " in plan
    assert "(the exact diagonal, shared with the per-layer traces)" in plan
    assert "  4. per-layer traces: exact, no further products (3 modules: sums of" in plan
    assert "  5. per-layer top eigenvalues: Lanczos, at most 900 products" in plan
    assert out.index("[1/5] top eigenvalues") < out.index("[4/5] per-layer traces")
    assert out.index("[4/5] per-layer traces") < out.index("[5/5] per-layer top eigenvalues")
    assert out.index("[5/5] per-layer top eigenvalues") < out.index("wrote")
    assert "## Top eigenvalues" in markdown
    assert "## Per layer" in markdown
    assert "activations" not in report  # the activation table is off by default
    assert "activations" not in report["plan"]
    assert "## Activations" not in markdown
    assert "![Spectral density](density.png)" in markdown
    assert f"exact: the sum of the exact diagonal ({diagonal} products)" in markdown
    assert f"| trace | exact | {diagonal} |" in markdown
    # the demo's eigenvalues and traces against the dense Hessian of the same trained network
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
    assert (trace["method"], trace["stderr"], trace["num_matvecs"]) == ("exact", 0.0, diagonal)
    torch.testing.assert_close(trace["value"], H.trace().item())
    start = 0
    for row in rows:  # each module's weight and bias are consecutive rows of H
        block = H[start : start + row["parameters"], start : start + row["parameters"]]
        start += row["parameters"]
        assert (row["trace_method"], row["trace_stderr"]) == ("exact", 0.0)
        torch.testing.assert_close(row["trace"], block.trace().item())
    assert sum(row["trace_num_matvecs"] for row in rows) == diagonal
    # the per-layer traces took no products of their own: the trace's diagonal served them
    assert report["num_matvecs"] == eig["num_matvecs"] + diagonal + 80 + sum(
        row["eigen_num_matvecs"] for row in rows
    )


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
        (["--per-layer", "foo"], r"argument --per-layer: invalid choice: 'foo'"),
        (["--k", "abc"], r"argument --k: invalid int value: 'abc'"),
        (["--dtype", "float16"], r"argument --dtype: invalid choice: 'float16'"),
    ],
)
def test_argparse_errors_take_one_line(args, message, capsys):
    # argparse printed its usage block, a dozen lines, before the error
    with pytest.raises(SystemExit) as stop:
        main(["report", *args])
    assert stop.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("torch-secorder report: error: ")
    assert re.search(message, lines[0]), lines[0]


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
        (
            ["--model", "{f}:model", "--data", "{f}:shuffled"],
            r"--data: a DataLoader whose RandomSampler draws another order on every pass; .* "
            r"use shuffle=False \(or a fixed sampler\)$",
        ),
        (["--model", "{f}:model"], r"--model and --data go together"),
        (["--checkpoint", "missing.pt"], r"--checkpoint: no such file missing.pt"),
        (["--loss", "hinge"], r"--loss must be one of cross-entropy, mse or module:fn"),
        (["--k", "0"], r"--k must be positive"),
        (["--probes", "0"], r"--probes must be positive"),
        (["--device", "nonsense"], r"--device: unknown device 'nonsense'"),
        (
            ["--model", "{f}:model", "--data", "{f}:data", "--params", "nope.*"],
            r"--params: entry 'nope.\*' matches no parameter of the model; its parameters are: "
            r"0.weight, 0.bias, 2.weight, 2.bias",
        ),
        (["--trace-matvecs", "2"], r"--trace-matvecs must be at least 3 \(Hutch\+\+ needs"),
        (["--per-layer", "trace", "--layer-matvecs", "1"], r"--layer-matvecs must be at least 3"),
        (
            ["--model", "{f}:model", "--data", "{f}:data", "--activations", "2", "nope*"],
            r"--activations: entry 'nope\*' matches no module of the model; its modules are: "
            r"0, 1, 2\.$",
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


@pytest.mark.parametrize(
    ("write", "message"),
    [
        (
            lambda path: torch.save(nn.Linear(4, 6), path),
            r"holds more than tensors \(a whole model saved with torch.save\(model\)\?\); save "
            r"its state dict instead: torch.save\(model.state_dict\(\), path\)$",
        ),
        (lambda path: path.write_text("notes"), r"cannot read .*: not a file torch.save wrote$"),
    ],
)
def test_checkpoints_that_are_not_state_dicts(write, message, tmp_path, factories, capsys):
    checkpoint = tmp_path / "file.pt"
    write(checkpoint)
    args = ["--out", str(tmp_path), "--model", f"{factories}:model", "--data", f"{factories}:data"]
    status, _, err = run([*args, "--checkpoint", str(checkpoint)], capsys)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert re.search(message, line), line
    assert "\x1b" not in line


def test_an_error_of_the_model_on_the_data_says_how_to_see_where(tmp_path, factories, capsys):
    args = ["--out", str(tmp_path), "--model", f"{factories}:wide", "--data", f"{factories}:data"]
    status, _, err = run(args, capsys)
    assert status == 2
    (line,) = err.strip().splitlines()
    assert line.startswith("torch-secorder report: error: RuntimeError: mat1 and mat2 shapes")
    assert line.endswith(" (--traceback shows where)")


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
        (
            ["--activations", "fc"],
            r"--activations: entry 'fc' matches no module of the model; its modules are: 0, 1, "
            r"2, 3, 4\.$",
        ),
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


@pytest.mark.skipif(not Path("/sys/fs").is_dir(), reason="needs a folder no one can write")
def test_out_that_cannot_be_written_is_refused_before_any_work(capsys, no_training):
    # os.access said yes to root there: the demo trained before the report failed to write
    status, _, err = run(["--out", "/sys/fs"], capsys)
    assert status == 2
    assert no_training == []
    assert "--out: /sys/fs is not writable" in err


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
    assert "[2/5] trace" in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert len(report["top_eigenvalues"]["eigenvalues"]) == 2
    # 17 products of the exact diagonal, over the budget of 12
    assert (report["trace"]["method"], report["trace"]["num_matvecs"]) == ("hutch++", 12)
    assert "spectral_density" not in report
    assert "per_layer" not in report
    assert report["failed"] == {
        "stage": "spectral density",
        "error": "RuntimeError: failed to allocate 7.3 GB",
    }
    statuses = [entry["status"] for entry in report["plan"]["stages"]]
    assert statuses == ["done", "done", "failed", "pending", "pending"]
    assert report["num_matvecs"] == report["top_eigenvalues"]["num_matvecs"] + 12
    markdown = (tmp_path / "report.md").read_text()
    assert (
        "**Stage 'spectral density' failed** (RuntimeError: failed to allocate 7.3 GB)" in markdown
    )
    assert "## Top eigenvalues\n\nThick-restart Lanczos" in markdown
    assert "## Per layer\n\nNot computed (pending)." in markdown
    assert not (tmp_path / "density.png").exists()


@pytest.mark.parametrize(
    ("function", "stage", "statuses"),
    [
        ("layer_traces", "per-layer traces", ["done"] * 3 + ["interrupted", "pending"]),
        ("layer_top_eigenvalues", "per-layer top eigenvalues", ["done"] * 4 + ["interrupted"]),
    ],
)
def test_interrupted_stage_keeps_the_finished_ones(
    function, stage, statuses, tmp_path, factories, capsys, monkeypatch
):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(f"torch_secorder._report.{function}", interrupt)
    status, _, err = run([*user_args(factories, tmp_path), *SMALL, "--per-layer", "all"], capsys)
    assert status == 130
    assert err.strip() == (
        f"torch-secorder report: interrupted during stage {stage!r}; the finished stages are "
        f"in {tmp_path / 'report.md'}"
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert {"top_eigenvalues", "trace", "spectral_density"} <= set(report)
    assert [entry["status"] for entry in report["plan"]["stages"]] == statuses
    assert (tmp_path / "density.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    if function == "layer_traces":
        assert "per_layer" not in report
        assert (
            "**Incomplete**: not finished: per-layer traces, per-layer top eigenvalues." in markdown
        )
    else:  # the traces' table is kept, without eigenvalues
        assert [row["top_eigenvalue"] for row in report["per_layer"]] == [None, None]
        assert "**Incomplete**: not finished: per-layer top eigenvalues." in markdown
        assert "top eigenvalues not computed (interrupted)" in markdown


def test_per_layer_choices(tmp_path, factories, capsys):
    reports = {}
    for choice in ("all", "trace", "none"):
        out = tmp_path / choice
        args = [*user_args(factories, out, "scaled"), *SMALL, "--layer-matvecs", "30"]
        status, _, err = run([*args, "--per-layer", choice, "--dtype", "float64"], capsys)
        assert status == 0, err
        reports[choice] = json.loads((out / "report.json").read_text())
    rows = reports["all"]["per_layer"]
    # the model's own parameter forms the group "" (its module name), shown as "(root)"
    assert [(r["module"], r["type"], r["parameters"]) for r in rows] == [
        ("", "Scaled", 4),
        ("body.0", "Linear", 30),
        ("body.2", "Linear", 21),
    ]
    assert all(r["top_eigenvalue"] is not None for r in rows)
    traces = reports["trace"]["per_layer"]
    assert all(r["top_eigenvalue"] is None for r in traces)
    for a, b in zip(rows, traces):  # the traces do not depend on the eigenvalues' stage
        assert a["trace"] == b["trace"]
    assert "per_layer" not in reports["none"]
    statuses = [entry["status"] for entry in reports["none"]["plan"]["stages"]]
    assert statuses[3:] == ["skipped", "skipped"]
    assert reports["trace"]["plan"]["stages"][4]["status"] == "skipped"
    assert (
        "## Per layer\n\nSkipped (--per-layer none)"
        in (tmp_path / "none" / "report.md").read_text()
    )
    # The exact diagonal takes more products than the trace's budget of 12, but every module's
    # share fits the module budget of 30: with per-layer traces the diagonal is computed for
    # them and the whole-model trace is its sum; without, the whole-model trace is Hutch++.
    diagonal = reports["all"]["plan"]["exact_diagonal"]["products"]
    assert 12 < diagonal <= 30
    assert all(r["trace_method"] == "exact" for r in rows)
    assert sum(r["trace_num_matvecs"] for r in rows) == diagonal
    assert reports["all"]["trace"] == reports["trace"]["trace"]
    assert reports["all"]["trace"]["method"] == "exact"
    assert reports["all"]["trace"]["num_matvecs"] == diagonal
    assert reports["all"]["plan"]["stages"][3]["products"] == 0
    assert reports["none"]["trace"]["method"] == "hutch++"
    assert reports["none"]["trace"]["num_matvecs"] == 12
    from report_factories import data, scaled

    x, y = data().tensors
    model = scaled().double()
    H = hessian_matrix(
        lambda: nn.functional.cross_entropy(model(x.double()), y), list(model.parameters())
    )
    torch.testing.assert_close(reports["all"]["trace"]["value"], H.trace().item())
    start = 0
    for row in rows:
        block = H[start : start + row["parameters"], start : start + row["parameters"]]
        start += row["parameters"]
        torch.testing.assert_close(row["trace"], block.trace().item())
        top = torch.linalg.eigvalsh(block)[-1].item()
        torch.testing.assert_close(row["top_eigenvalue"], top, rtol=1e-4, atol=0)


def test_trace_falls_back_to_hutch_plus_plus_and_module_traces_mix(tmp_path, factories, capsys):
    """A weight used directly costs a product per element (160 > the budget of 100)."""
    args = [*user_args(factories, tmp_path, "raw"), "--dtype", "float64"]
    status, out, err = run([*args, "--k", "2", "--probes", "2", "--steps", "20"], capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    diagonal = report["plan"]["exact_diagonal"]["products"]
    assert diagonal > 160
    plan = out[: out.index("[1/")]
    assert "  2. trace: Hutch++, 100 products, " in plan
    assert f"(budget 100; the exact diagonal would take {diagonal} products)" in plan
    trace = report["trace"]
    assert (trace["method"], trace["num_matvecs"]) == ("hutch++", 100)
    assert trace["stderr"] > 0
    markdown = (tmp_path / "report.md").read_text()
    assert f"(standard error; Hutch++, 100 products; the exact diagonal would take {diagonal})" in (
        markdown
    )
    rows = report["per_layer"]
    assert [(r["module"], r["trace_method"]) for r in rows] == [
        ("", "hutch++"),
        ("head", "exact"),
    ]
    head = rows[1]["trace_num_matvecs"]
    assert head < 100
    assert f"  4. per-layer traces: exact and Hutch++, {head + 100} products" in plan
    assert (
        f"(2 modules: 1 exact, from one exact diagonal of their parameters ({head} "
        "products); 1 by Hutch++, budget 100 each (100 products))"
    ) in plan
    assert report["plan"]["stages"][3]["products_used"] == head + 100
    assert "| (root) | Raw | 160 |" in markdown
    assert "| Hutch++ |" in markdown
    assert f"| head | Linear | 123 | {rows[1]['trace']:.6g} |  | exact |" in markdown
    from report_factories import data, raw

    x, y = data().tensors
    model = raw().double()
    H = hessian_matrix(
        lambda: nn.functional.cross_entropy(model(x.double()), y), list(model.parameters())
    )
    assert abs(trace["value"] - H.trace().item()) < 4 * trace["stderr"]
    assert abs(rows[0]["trace"] - H[:160, :160].trace().item()) < 4 * rows[0]["trace_stderr"]
    torch.testing.assert_close(rows[1]["trace"], H[160:, 160:].trace().item())
    assert rows[1]["trace_stderr"] == 0.0


def test_a_diagonal_that_cannot_be_planned_leaves_the_traces_to_hutch_plus_plus(
    tmp_path, factories, capsys, monkeypatch
):
    def refuse(*args, **kwargs):
        raise RuntimeError("no plan\nmore detail")

    monkeypatch.setattr("torch_secorder._report.planned_diagonal_costs", refuse)
    status, out, err = run(
        [*user_args(factories, tmp_path), *SMALL, "--per-layer", "trace"], capsys
    )
    assert status == 0, err
    assert (
        "Every trace by Hutch++: the exact diagonal could not be planned (RuntimeError: no " in out
    )
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plan"]["exact_diagonal"] == {
        "products": None,
        "note": "the exact diagonal could not be planned (RuntimeError: no plan)",
    }
    assert (report["trace"]["method"], report["trace"]["num_matvecs"]) == ("hutch++", 12)
    assert [row["trace_method"] for row in report["per_layer"]] == ["hutch++", "hutch++"]


def test_auto_per_layer_is_a_rule_of_products():
    from torch_secorder._report import make_plan

    def plan(layers, **options):
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(layers)])
        return make_plan(model, **options)

    # Priced before the exact diagonal is planned: every trace by Hutch++.
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
    assert plan(6).products == {
        "top eigenvalues": 700,
        "trace": 100,
        "spectral density": 400,
        "per-layer traces": 600,
        "per-layer top eigenvalues": 1800,
    }


def test_density_probes_follow_the_library_default():
    from torch_secorder._report import make_plan

    # 4 probes on a small selection, one from 65,536 parameters on, as spectral_density takes
    assert make_plan(nn.Linear(8, 8)).probes == 4
    big = nn.Sequential(nn.Linear(8, 8), nn.Linear(256, 256))
    assert make_plan(big).probes == 1
    assert make_plan(big).products["spectral density"] == 100
    assert make_plan(big, params="0.*").probes == 4  # the selection's size decides
    assert make_plan(big, probes=3).probes == 3


def test_exact_traces_are_priced_from_the_planned_diagonal():
    from torch_secorder._report import make_plan

    def plan(costs, **options):
        model = nn.Sequential(*[nn.Linear(8, 8) for _ in range(len(costs))])
        return make_plan(model, diagonal=[c for cost in costs for c in (cost, 0)], **options)

    # The whole diagonal within the trace's budget: every trace is a sum of it, the
    # per-layer traces take no further products, and the eigenvalues come when they fit.
    cheap = plan([3] * 25)
    assert (cheap.trace_method, cheap.products["trace"]) == ("exact", 75)
    assert set(cheap.layer_methods.values()) == {"exact"}
    assert cheap.per_layer == "trace"  # 25 x 300 > 2 x (700 + 75 + 400)
    assert cheap.products["per-layer traces"] == 0
    assert plan([3] * 6).per_layer == "all"  # 6 x 300 <= 2 x (700 + 18 + 400)
    assert plan([3] * 25, per_layer="none").trace_method == "exact"
    # Over the trace's budget, but every module within its own: the per-layer traces take
    # the whole diagonal, which the whole-model trace computes first and shares.
    shared = plan([80] * 25)
    assert (shared.trace_method, shared.products["trace"]) == ("exact", 2000)
    assert shared.per_layer == "trace"
    assert shared.products["per-layer traces"] == 0
    assert plan([80] * 25, per_layer="none").trace_method == "hutch++"
    # One module over its budget: Hutch++ for it and for the whole model; one diagonal of the
    # other modules' parameters, priced by their shares or by a plan of that selection.
    mixed = plan([80] * 24 + [200])
    assert (mixed.trace_method, mixed.products["trace"]) == ("hutch++", 100)
    assert mixed.layer_methods["24"] == "hutch++"
    assert mixed.exact_modules() == [str(i) for i in range(24)]
    assert (mixed.subset, mixed.products["per-layer traces"]) == (1920, 2020)
    assert mixed.per_layer == "trace"  # 2020 <= 2 x 1200
    priced = plan([80] * 24 + [200], subset_costs=lambda modules: dict.fromkeys(modules, 5))
    assert (priced.subset, priced.products["per-layer traces"]) == (120, 220)

    # A module within its share of the whole plan but over the budget planned without the
    # others: Hutch++, and the rest planned again
    def alone(modules):
        return {name: 150 if name == "0" else 70 for name in modules}

    replanned = plan([80] * 24 + [200], subset_costs=alone)
    assert replanned.layer_methods["0"] == "hutch++"
    assert replanned.exact_modules() == [str(i) for i in range(1, 24)]
    assert replanned.subset == 23 * 70
    # every module over its budget
    assert plan([200] * 3, per_layer="trace").products["per-layer traces"] == 300
    with pytest.raises(ValueError, match="diagonal must hold one count per selected parameter"):
        make_plan(nn.Linear(2, 2), diagonal=[1])


def test_many_modules_keep_their_exact_traces_without_eigenvalues(tmp_path, factories, capsys):
    # 32 tanh layers: the exact diagonal takes 259 products, each module at most 14 of them;
    # their 32 x 300 eigenvalue products are more than 2 x the 400 + 259 + 20 of stages 1-3
    args = [*user_args(factories, tmp_path, "deep"), "--k", "2", "--probes", "2", "--steps", "10"]
    status, out, err = run(args, capsys)
    assert status == 0, err
    assert "  2. trace: exact, 259 products, " in out
    assert "the exact diagonal: above the budget of 100, but the per-layer traces" in out
    assert "  4. per-layer traces: exact, no further products (32 modules" in out
    assert (
        "  5. per-layer top eigenvalues: skipped (--per-layer auto: Lanczos for 32 modules would "
        "take at most 9600 products (9600 with the traces), more than 2 x the 679 products of "
        "stages 1-3; --per-layer all runs it)"
    ) in out
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["plan"]["per_layer"]["chosen"] == "trace"
    assert len(report["per_layer"]) == 32
    assert sum(row["trace"] for row in report["per_layer"]) == pytest.approx(
        report["trace"]["value"], rel=1e-5
    )
    assert "top eigenvalues skipped (--per-layer auto)" in (tmp_path / "report.md").read_text()


def test_model_module_in_the_working_directory(tmp_path, capsys, monkeypatch):
    """``--model mymodule:make_model`` finds ``mymodule.py`` where the command runs."""
    (tmp_path / "report_cwd_model.py").write_text(
        textwrap.dedent(
            """
            import torch
            from torch import nn

            def make_model():
                torch.manual_seed(0)
                return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))

            def make_data():
                import report_cwd_helper  # a sibling module, imported when the data is made

                return report_cwd_helper.batch()
            """
        )
    )
    (tmp_path / "report_cwd_helper.py").write_text(
        "import torch\n\ndef batch():\n"
        "    g = torch.Generator().manual_seed(0)\n"
        "    return torch.randn(8, 3, generator=g), torch.randint(0, 2, (8,), generator=g)\n"
    )
    monkeypatch.chdir(tmp_path)
    for name in ("report_cwd_model", "report_cwd_helper"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    before = list(sys.path)
    args = ["--out", "out", "--model", "report_cwd_model:make_model"]
    args += ["--data", "report_cwd_model:make_data", "--k", "1", "--probes", "1", "--steps", "5"]
    status, _, err = run(args, capsys)
    assert status == 0, err
    assert json.loads((tmp_path / "out" / "report.json").read_text())["complete"]
    assert sys.path == before  # the working directory was on the path for the imports only
    status, _, err = run([*args[:2], "--model", "report_cwd_nothing:f", *args[4:]], capsys)
    assert status == 2
    assert "--model: cannot import 'report_cwd_nothing'" in err


# ----------------------------------------------------------------------------- activation table

QUICK = ["--dtype", "float64", "--batch-size", "16", "--k", "1", "--probes", "1", "--steps", "5"]
"""Small whole-model stages, float64, the 40 samples of ``data`` in batches of 16, 16 and 8."""


def float64_batches():
    from report_factories import data

    x, y = data().tensors
    return [(x[i : i + 16].double(), y[i : i + 16]) for i in range(0, 40, 16)]


def test_the_plan_of_the_activation_traces_is_what_they_compute(tmp_path, capsys):
    # the demo's three module outputs at a budget of 40: in the plan of all three, two fit;
    # planned without the first, the checks of independent samples count for the second,
    # which no longer fits (method="auto" of model_hessian_trace replans): one exact
    args = ["--out", str(tmp_path), "--k", "1", "--probes", "1", "--steps", "10"]
    args += ["--layer-matvecs", "40", "--per-layer", "trace", "--activations"]
    status, _, err = run(args, capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    methods = {row["module"]: row["trace_method"] for row in report["activations"]}
    assert report["plan"]["activations"]["trace_methods"] == methods
    assert sorted(methods.values()) == ["exact", "hutch++", "hutch++"]
    stage = next(e for e in report["plan"]["stages"] if e["stage"] == "activation traces")
    assert stage["products_used"] == stage["products"]


@pytest.mark.parametrize(
    ("factory", "options", "modules", "methods", "line"),
    [
        # every module owning parameters, the model's own output "" first; all exact
        (
            "scaled",
            ["--activations"],
            ["", "body.0", "body.2"],
            ["exact"] * 3,
            "  6. activation traces: exact, 18 products, 0.0 s (3 module outputs, from one exact "
            "diagonal (18 products))",
        ),
        # chosen modules: the Tanh's output (6 per sample, whose diagonal takes more than the
        # budget of 9: Hutch++) and the logits (3 per sample, exact with the 6 products of
        # the checks that the samples are independent)
        (
            "model",
            ["--activations", "1", "2", "--layer-matvecs", "9"],
            ["1", "2"],
            ["hutch++", "exact"],
            "  6. activation traces: exact and Hutch++, 18 products, 0.0 s (2 module outputs: 1 "
            "exact, from one exact diagonal (9 products); 1 by Hutch++, budget 9 each (9 "
            "products))",
        ),
    ],
)
def test_activation_table(factory, options, modules, methods, line, tmp_path, factories, capsys):
    args = [*user_args(factories, tmp_path, factory), *QUICK, "--per-layer", "none", *options]
    status, out, err = run(args, capsys)
    assert status == 0, err
    report = json.loads((tmp_path / "report.json").read_text())
    markdown = (tmp_path / "report.md").read_text()
    rows = report["activations"]
    assert [row["module"] for row in rows] == modules
    statuses = [entry["status"] for entry in report["plan"]["stages"]]
    assert statuses == ["done"] * 3 + ["skipped"] * 2 + ["done"] * 2
    traces = report["plan"]["stages"][5]
    assert traces["products_used"] == traces["products"]  # the exact diagonal as planned
    assert report["num_matvecs"] == sum(e.get("products_used", 0) for e in report["plan"]["stages"])
    assert out.index("  7. activation top eigenvalues: Lanczos, at most ") < out.index("[1/5]")
    assert "[6/7]" not in out  # two per-layer stages skipped: seven planned, five run
    assert out.index("[4/5] activation traces") < out.index("[5/5] activation top eigenvalues")
    assert re.sub(r"\d+\.\d s \(", "0.0 s (", line) in re.sub(r"\d+\.\d s \(", "0.0 s (", out)
    assert [row["trace_method"] for row in rows] == methods
    # the numbers of the library's model forms, called directly on the same data
    model = getattr(importlib.import_module("report_factories"), factory)().double()
    batches = float64_batches()
    budget = 9 if "--layer-matvecs" in options else 100
    common = {"wrt": "activations", "modules": modules, "groups": "module"}
    expected_traces = ts.model_hessian_trace(
        model, nn.CrossEntropyLoss(), batches, **common, num_matvecs=budget,
        generator=torch.Generator().manual_seed(0),
    )  # fmt: skip
    expected_tops = ts.model_top_eigenvalues(
        model, nn.CrossEntropyLoss(), batches, **common, generator=torch.Generator().manual_seed(0)
    )
    for row in rows:
        trace, top = expected_traces[row["module"]], expected_tops[row["module"]]
        assert row["trace"] == trace.value.item()
        assert row["trace_stderr"] == trace.stderr.item()
        assert (row["trace_method"], row["trace_num_matvecs"]) == (trace.method, trace.num_matvecs)
        assert row["top_eigenvalue"] == top.eigenvalues[0].item()
        assert (row["converged"], row["eigen_num_matvecs"]) == (top.converged, top.num_matvecs)
        assert row["num_matvecs"] == trace.num_matvecs + top.num_matvecs
    # and the Hessian of the model split at each module, by torch.func
    per_sample = {"": 3, "body.0": 6, "body.2": 3, "1": 6, "2": 3}
    for name, row in zip(modules, rows):
        H = ref.variable_hessian(model, nn.CrossEntropyLoss(), batches, [name])
        assert row["entries"] == H.shape[0] == 40 * per_sample[name]
        assert row["entries_per_sample"] == per_sample[name]
        assert row["trace_per_entry"] == row["trace"] / per_sample[name]
        if row["trace_method"] == "exact":
            torch.testing.assert_close(row["trace"], H.trace().item())
        else:
            assert abs(row["trace"] - H.trace().item()) < 4 * row["trace_stderr"]
        top = torch.linalg.eigvalsh(H)[-1].item()
        torch.testing.assert_close(row["top_eigenvalue"], top, rtol=1e-4, atol=0)
    assert "## Activations" in markdown
    assert "(root) holds" not in markdown
    row = rows[-1]
    assert (
        f"| {row['module']} | Linear | 3 | {row['trace']:.6g} |  | exact | "
        f"{row['trace_per_entry']:.4g} | {row['top_eigenvalue']:.6g} | {row['num_matvecs']} |"
    ) in markdown


def test_activation_plan_before_the_data():
    from torch_secorder._report import STAGES, make_plan

    model = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 2))
    plan = make_plan(model, activations=[])  # the modules owning parameters
    assert plan.stages == (*STAGES, "activation traces", "activation top eigenvalues")
    assert plan.activations.modules == ["0", "2"]
    # every trace priced as Hutch++ at the module budget, every eigenvalue at its cap
    assert plan.products["activation traces"] == 200
    assert plan.products["activation top eigenvalues"] == 600
    assert make_plan(model, activations=["*"], layer_matvecs=30).products["activation traces"] == (
        3 * 30
    )
    assert make_plan(model, activations=[""]).activations.modules == [""]
    assert make_plan(model).stages == STAGES
    assert "activation traces" not in make_plan(model).products
    with pytest.raises(ValueError, match="make_plan: modules entry 'x' matches no module"):
        make_plan(model, activations=["x"])


def test_activations_of_a_module_called_twice_are_refused_before_any_product(
    tmp_path, factories, capsys
):
    status, out, err = run(
        [*user_args(factories, tmp_path, "twice"), "--activations", "act"], capsys
    )
    assert status == 2
    assert out == ""
    assert err.strip() == (
        "torch-secorder report: error: --activations selects 'act', which is called 2 times in "
        "the forward pass of data batch 0, so it has no single output; choose a module called "
        "once (one nn.ReLU reused at several places is called several times)."
    )


def test_failed_activation_eigenvalues_keep_the_activation_traces(
    tmp_path, factories, capsys, monkeypatch
):
    def out_of_memory(*args, **kwargs):
        raise RuntimeError("failed to allocate 7.3 GB")

    monkeypatch.setattr("torch_secorder._report.activation_top_eigenvalues", out_of_memory)
    args = [*user_args(factories, tmp_path), *SMALL, "--activations", "0", "2"]
    status, _, err = run(args, capsys)
    assert status == 2
    assert "stage 'activation top eigenvalues' failed: RuntimeError: failed to allocate" in err
    report = json.loads((tmp_path / "report.json").read_text())
    assert [entry["status"] for entry in report["plan"]["stages"]][-2:] == ["done", "failed"]
    assert [row["top_eigenvalue"] for row in report["activations"]] == [None, None]
    assert all(row["trace"] > 0 for row in report["activations"])
    markdown = (tmp_path / "report.md").read_text()
    assert "top eigenvalues not computed (failed)" in markdown


def test_progress_bars_count_every_product(tmp_path, factories, capsys, monkeypatch):
    bars = {}

    class Bar:
        def __init__(self, stage, total):
            self.total, self.count = total, 0
            bars[stage] = self

        def update(self, products):
            self.count += products

        def close(self):
            pass

    monkeypatch.setattr(
        "torch_secorder._report._bar", lambda enabled, stage, total: Bar(stage, total)
    )
    args = ["report", *user_args(factories, tmp_path), *SMALL, "--layer-matvecs", "9"]
    status = main([*args, "--per-layer", "all", "--activations", "1", "2"])
    capsys.readouterr()
    assert status == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for entry in report["plan"]["stages"]:
        bar = bars[entry["stage"]]
        assert bar.total == entry["products"]
        assert bar.count == entry["products_used"], entry["stage"]


def test_report_json_is_standard_json(tmp_path, factories, capsys):
    # Hutch++ of 3 products has one probe: an undefined standard error, NaN in the report,
    # which report.json wrote as the NaN token strict JSON parsers refuse; now null
    args = [*user_args(factories, tmp_path, "raw"), "--trace-matvecs", "3"]
    status, _, err = run([*args, "--per-layer", "none", "--k", "1", "--steps", "10"], capsys)
    assert status == 0, err

    def refuse(token):
        raise ValueError(f"not standard JSON: {token}")

    report = json.loads((tmp_path / "report.json").read_text(), parse_constant=refuse)
    assert (report["trace"]["method"], report["trace"]["stderr"]) == ("hutch++", None)
    markdown = (tmp_path / "report.md").read_text()
    assert "(Hutch++, 3 products: one probe, no standard error; " in markdown
    assert "nan" not in markdown


def test_a_plot_not_written_leaves_none_of_an_earlier_report(
    tmp_path, factories, capsys, monkeypatch
):
    import torch_secorder._report as report_module

    def no_matplotlib(*args, **kwargs):
        raise ImportError("plot_spectral_density needs matplotlib")

    (tmp_path / "density.png").write_bytes(b"an earlier report's plot")
    monkeypatch.setattr(report_module, "plot_spectral_density", no_matplotlib)
    args = [*user_args(factories, tmp_path, "raw"), "--per-layer", "none", "--k", "1"]
    status, _, err = run([*args, "--steps", "10"], capsys)
    assert status == 0, err
    assert not (tmp_path / "density.png").exists()
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["spectral_density"]["plot"] is None
