"""Every example script runs end to end and passes its own check against a reference.

Each ``examples/example_*.py`` runs as a subprocess with an output directory in ``tmp_path``;
it raises, and so exits non-zero, when its results disagree with its reference. The dataset
example is also launched on two processes with ``torchrun`` (the ``gloo`` backend on CPU).
"""

import ast
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("example_*.py"))
TIMEOUT = 300  # seconds; each example takes a few seconds on an idle CPU core


def run(command, tmp_path):
    # One intra-op thread unless the caller chose otherwise: the models are tiny, and on a
    # busy machine spinning OpenMP threads make them an order of magnitude slower.
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MPLBACKEND": "Agg"}
    done = subprocess.run(
        command, capture_output=True, text=True, timeout=TIMEOUT, cwd=tmp_path, env=env
    )
    assert done.returncode == 0, f"exit code {done.returncode}\n{done.stdout}\n{done.stderr}"
    return done


def test_examples_are_found():
    names = {script.name for script in EXAMPLES}
    assert {
        "example_quickstart.py",
        "example_transformer_diagonal.py",
        "example_dataset_scale.py",
        "example_trained_network.py",
        "example_per_layer.py",
        "example_resnet_diagonal.py",
    } <= names


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda script: script.stem)
def test_example_has_docstring_cells_and_out_option(script):
    source = script.read_text()
    docstring = ast.get_docstring(ast.parse(source))
    assert docstring, "a module docstring with a title and what the script shows"
    assert docstring.splitlines()[1] == "", "a one-line title, then a blank line"
    assert "# %%" in source, "cells for sphinx-gallery and editors"
    assert "--out" in source, "outputs go to a directory given on the command line"


@pytest.mark.parametrize("script", EXAMPLES, ids=lambda script: script.stem)
def test_example_runs_and_writes_outputs(script, tmp_path):
    out = tmp_path / "out"
    # -W error: an example must not trigger warnings (deprecations, non-convergence).
    run([sys.executable, "-W", "error", str(script), "--out", str(out)], tmp_path)
    assert any(out.iterdir()), "the example wrote no output"


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.distributed
def test_dataset_example_on_two_processes(tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2"]
    command += ["--master_port", str(free_port()), str(ROOT / "examples/example_dataset_scale.py")]
    command += ["--out", str(out), "--samples", "600"]
    run(command, tmp_path)
    results = [json.loads((out / f"dataset_scale_rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, result in enumerate(results):
        assert result["world_size"] == 2
        assert result["rank"] == rank
        assert result["num_samples"] == 600  # every rank sees the whole data set's Hessian
    assert results[0]["rayleigh_quotients"] == pytest.approx(results[1]["rayleigh_quotients"])
