import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import torch_secorder as ts
from torch_secorder import HessianOperator

WORKER = Path(__file__).with_name("distributed_worker.py")
sys.path.insert(0, str(WORKER.parent))
from distributed_worker import model_and_shards, probe_columns  # noqa: E402

pytestmark = pytest.mark.distributed


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(shards, tmp_path, timeout=120, extra=()):
    port = free_port()
    outs = [tmp_path / f"rank{rank}.pt" for rank in range(2)]
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(rank),
                "2",
                str(port),
                json.dumps(shards),
                str(out),
                *extra,
            ],
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


@pytest.mark.parametrize(
    "shards",
    [[[4, 4], [4, 4]], [[3], [5, 2, 7]], [[], [5, 2]]],
    ids=["equal", "unequal", "one-empty"],
)
def test_two_processes_match_one(shards, tmp_path):
    results = run_two_ranks(shards, tmp_path)
    model, batches = model_and_shards(shards)
    single = HessianOperator.from_model(model, nn.MSELoss(), batches[0] + batches[1])
    expected = single @ probe_columns(single.shape[0])
    for result in results:
        assert_close(result["product"], expected)
        assert result["num_samples"] == sum(map(sum, shards))
        assert result["num_matvecs"] == 3


def test_two_processes_match_one_with_dropout(tmp_path):
    # the batches are numbered rank by rank for their seeds: the same masks as in one process
    shards = [[3, 2], [4]]
    results = run_two_ranks(shards, tmp_path, extra=["dropout"])
    model, batches = model_and_shards(shards, dropout=True)
    single = HessianOperator.from_model(model, nn.MSELoss(), batches[0] + batches[1])
    expected = single @ probe_columns(single.shape[0])
    for result in results:
        assert_close(result["product"], expected)
    # numbered within each rank, rank 1's batch 0 would draw rank 0's masks: another matrix
    V, sizes = probe_columns(single.shape[0]), [*shards[0], *shards[1]]
    seeds = [*range(len(shards[0])), *range(len(shards[1]))]
    per_rank = sum(
        n * (HessianOperator.from_model(model, nn.MSELoss(), [batch], seed=seed) @ V)
        for n, batch, seed in zip(sizes, batches[0] + batches[1], seeds)
    )
    assert not torch.allclose(expected, per_rank / sum(sizes))


def test_a_process_with_one_batch_requests_as_one_with_several(tmp_path):
    # its kept graph had it request narrower chunks than the other's passes over the data:
    # the processes' sums of products did not match (gloo aborted); and the exact diagonal's
    # products are the most any batch of any process took, as in one process
    from distributed_worker import groups_case

    shards = [[3], [2, 4]]
    results = run_two_ranks(shards, tmp_path, extra=["groups"])
    model, batches = model_and_shards(shards)
    single = groups_case(model, batches[0] + batches[1])
    for result in results:
        assert result["traces"].keys() == single["traces"].keys()
        for name, value in single["traces"].items():
            assert result["traces"][name] == pytest.approx(value, rel=1e-12)
        assert_close(result["diagonal"], single["diagonal"])
        assert result["products"] == single["products"]


def test_a_process_without_batches_adds_nothing(tmp_path):
    # its shard was refused as empty while the other process waited for it until the timeout
    from distributed_worker import groups_case

    shards = [[], [2, 4]]
    results = run_two_ranks(shards, tmp_path, extra=["groups"])
    model, batches = model_and_shards(shards)
    single = groups_case(model, batches[1])
    for result in results:
        for name, value in single["traces"].items():
            assert result["traces"][name] == pytest.approx(value, rel=1e-12)
        assert_close(result["diagonal"], single["diagonal"])
        assert result["products"] == single["products"]


def test_no_batch_on_any_process_is_an_error_on_every_process(tmp_path):
    for result in run_two_ranks([[], []], tmp_path, timeout=60):
        assert "data holds no samples; expected at least one" in result["error"]


def test_data_refused_on_one_process_is_refused_on_every_process(tmp_path):
    # the other process waited in its first product for the one that raised
    first, second = run_two_ranks([[3], [2, 4]], tmp_path, timeout=60, extra=["refused"])
    assert first["error"].startswith(
        "RuntimeError: HessianOperator.from_model: another process raised an error checking "
        "its data"
    )
    assert second["error"].startswith("TypeError: HessianOperator.from_model: data batch 0")


def test_the_default_trace_chooses_as_one_process(tmp_path):
    # the exact diagonal's plan is the first batch's in rank order: the most of every rank's
    # first batch chose Hutch++ where one process holding both shards chose the exact trace
    shards = [[2], [8]]
    results = run_two_ranks(shards, tmp_path, extra=["auto"])
    model, batches = model_and_shards(shards)
    single = ts.model_hessian_trace(model, nn.MSELoss(), batches[0] + batches[1], num_matvecs=10)
    for result in results:
        assert result["method"] == single.method == "exact"
        assert result["value"] == pytest.approx(float(single.value), rel=1e-12)


@pytest.mark.parametrize("mode", ["unreadable", "broken stream"])
def test_a_loader_failing_on_one_process_stops_the_others(mode, tmp_path):
    # the first batch read when the operator is built (unreadable), the batches counted for
    # their seeds (a stream without a length): the other process waited or lost its peer
    first, second = run_two_ranks([[2, 2], [2, 2]], tmp_path, timeout=60, extra=[mode])
    assert first["error"].startswith("RuntimeError: model_hessian_trace: another process")
    assert second["error"] == "OSError: cannot read sample"
    assert first["rng kept"]
    assert second["rng kept"]


def test_a_streamed_shard_keeps_the_global_rng(tmp_path):
    from distributed_worker import Samples

    shards = [[2, 2], [2]]
    results = run_two_ranks(shards, tmp_path, extra=["stream"])
    model, batches = model_and_shards(shards)
    loader = torch.utils.data.DataLoader(Samples(batches[0] + batches[1], False), batch_size=2)
    single = ts.model_hessian_trace(model, nn.MSELoss(), loader, method="hutchinson")
    for result in results:
        assert result["rng kept"]
        assert result["value"] == pytest.approx(float(single.value), rel=1e-12)


def test_an_error_in_one_process_s_plan_stops_the_others(tmp_path):
    first, second = run_two_ranks([[3], [2, 4]], tmp_path, timeout=60, extra=["plan"])
    assert first["error"].startswith("RuntimeError: model_hessian_trace: another process")
    assert second["error"].startswith("RuntimeError: mat1 and mat2 shapes cannot be multiplied")


def test_passes_that_differ_on_one_process_raise_on_every_process(tmp_path):
    first, second = run_two_ranks([[4], [3, 2]], tmp_path, extra=["differs"])
    assert "data passes of another process differ" in first["error"]
    assert "data batch 0 differs between passes" in second["error"]


def test_an_error_in_one_process_stops_the_others(tmp_path):
    # the other process waited in its sum of the products until the group's timeout
    first, second = run_two_ranks([[3], [2, 4]], tmp_path, timeout=60, extra=["raises"])
    for what in ("product", "diagonal"):
        assert first[what].startswith("RuntimeError: HessianOperator.from_model: another process")
        assert second[what].startswith("TypeError: HessianOperator.from_model: data batch 2")


def test_input_hessians_are_refused_by_default_across_processes(tmp_path):
    shards = [[3], [2, 4]]
    results = run_two_ranks(shards, tmp_path, extra=["inputs"])
    model, batches = model_and_shards(shards)
    for rank, result in enumerate(results):
        assert "torch.distributed is initialized, but with wrt='inputs'" in result["error"]
        local = HessianOperator.from_model(model, nn.MSELoss(), batches[rank], wrt="inputs")
        eye = torch.eye(local.shape[0], dtype=local.dtype)
        assert_close(result["local"], local @ eye)


@pytest.mark.parametrize(("dtype", "samples"), [(torch.bfloat16, 1001), (torch.float16, 70000)])
def test_samples_are_counted_exactly_in_any_dtype(dtype, samples):
    # a count carried in the product's dtype rounds (bf16: 1001 -> 1000) or overflows (fp16)
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1
    )
    try:
        model = nn.Linear(2, 1, bias=False).to(dtype)
        x = torch.ones(samples, 2, dtype=dtype)
        H = HessianOperator.from_model(
            model, nn.MSELoss(), [(x, torch.zeros(samples, 1, dtype=dtype))]
        )
        product = H @ torch.ones(2, dtype=dtype)
    finally:
        torch.distributed.destroy_process_group()
    assert H.num_samples == samples
    assert_close(product, torch.full((2,), 4.0, dtype=dtype))  # H = 2 x^T x / N = 2 ones
