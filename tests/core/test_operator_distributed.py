import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from torch_secorder import HessianOperator

WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import model_and_shards, probe_columns  # noqa: E402

pytestmark = pytest.mark.distributed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(shards, tmp_path, timeout=120):
    port = free_port()
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(rank), "2", str(port), json.dumps(shards), str(out)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank, out in enumerate(outs)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            proc.kill()
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log
    return [torch.load(out) for out in outs]


@pytest.mark.parametrize("shards", [[[4, 4], [4, 4]], [[3], [5, 2, 7]]], ids=["equal", "unequal"])
def test_two_processes_match_one(shards, tmp_path):
    results = run_two_ranks(shards, tmp_path)
    model, batches = model_and_shards(shards)
    single = HessianOperator.from_model(model, nn.MSELoss(), batches[0] + batches[1])
    expected = single @ probe_columns(single.shape[0])
    for result in results:
        assert_close(result["product"], expected)
        assert result["num_samples"] == sum(map(sum, shards))
        assert result["num_matvecs"] == 3
