"""One process of the two-process test of HessianOperator over torch.distributed (gloo).

Usage: python distributed_worker.py RANK WORLD_SIZE PORT SHARDS OUT [MODE], where SHARDS is a
JSON list with one list of batch sizes per rank. Writes the rank's products to OUT. MODE:
``differs`` (the last rank's data changes with every pass, and every rank records the error
its second product raises), ``inputs`` (the Hessian with respect to the inputs: the error by
default, the products with ``distributed=False``), ``dropout`` (a dropout layer in training
mode), ``groups`` (a per-module Hutchinson trace and the exact diagonal's products, with one
batch on one rank and several on the other) or ``raises`` (the last rank's data ends with a
batch that is no ``(inputs, targets)`` pair, and every rank records the errors of a product and
of the exact diagonal) or ``plan`` (the last rank's first batch fails in the model, and
every rank records the error of a default trace, which plans the exact diagonal) or
``refused`` (the last rank's first batch is a triple, and every rank records the error of
building the operator), ``auto`` (every rank records the default trace's method and value),
``unreadable`` (the last rank's DataLoader cannot read its first batch), ``stream`` (every
rank's DataLoader streams an IterableDataset) or ``broken stream`` (the last rank's stream
fails), each rank recording a trace's error or value and whether the global RNG was kept. A
shard may be empty (no batch on that rank).
"""

import json
import sys

import torch
from torch import nn

import torch_secorder as ts
from torch_secorder import HessianOperator


def model_and_shards(shards, dropout=False):
    """The same model on every rank, and the batches of every rank's shard."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    if dropout:  # (in training mode: masks drawn under each batch's seed)
        model.insert(2, nn.Dropout(0.5))
    g = torch.Generator().manual_seed(1)
    batches = [
        [
            (
                torch.randn(n, 3, generator=g, dtype=torch.float64),
                torch.randn(n, 2, generator=g, dtype=torch.float64),
            )
            for n in sizes
        ]
        for sizes in shards
    ]
    return model, batches


def probe_columns(size):
    return torch.randn(size, 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


class ChangingBatches:
    """Batches whose inputs change with every pass over them."""

    def __init__(self, batches):
        self.batches = batches
        self.passes = 0

    def __iter__(self):
        self.passes += 1
        for x, y in self.batches:
            yield (x + self.passes, y)


def main(rank, world_size, port, shards, out, mode=""):
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        model, batches = model_and_shards(shards, dropout=mode == "dropout")
        data = batches[rank]
        differs = mode == "differs"
        if differs and rank == world_size - 1:
            data = ChangingBatches(data)
        if mode == "inputs":  # refused by default; distributed=False: this process's batches
            try:
                HessianOperator.from_model(model, nn.MSELoss(), data, wrt="inputs")
            except ValueError as err:
                error = str(err)
            local = HessianOperator.from_model(
                model, nn.MSELoss(), data, wrt="inputs", distributed=False
            )
            eye = torch.eye(local.shape[0], dtype=local.dtype)
            torch.save({"error": error, "local": local @ eye}, out)
            return
        if mode == "raises":
            if rank == world_size - 1:
                data = WithBadBatch(data)
            H = HessianOperator.from_model(model, nn.MSELoss(), data)
            errors = {}
            for name, call in (
                ("product", lambda: H @ probe_columns(H.shape[0])),
                ("diagonal", H.diagonal),
            ):
                try:
                    call()
                except (TypeError, RuntimeError) as err:
                    errors[name] = f"{type(err).__name__}: {err}"
            torch.save(errors, out)
            return
        if mode == "groups":
            torch.save(groups_case(model, data), out)
            return
        if mode == "refused":  # the last rank's first batch is no (inputs, targets) pair
            if rank == world_size - 1:
                x, y = data[0]
                data = [(x, y, y), *data[1:]]
            try:
                HessianOperator.from_model(model, nn.MSELoss(), data)
            except (TypeError, RuntimeError) as err:
                torch.save({"error": f"{type(err).__name__}: {err}"}, out)
            return
        if mode == "auto":  # the default trace's choice and what it took
            trace = ts.model_hessian_trace(model, nn.MSELoss(), data, num_matvecs=10)
            torch.save({"method": trace.method, "value": float(trace.value)}, out)
            return
        if mode in ("unreadable", "stream", "broken stream"):
            broken = mode != "stream" and rank == world_size - 1
            torch.save(loader_case(data, broken, "stream" in mode, model), out)
            return
        if mode == "plan":  # the last rank's first batch has inputs of the wrong width
            if rank == world_size - 1:
                x, y = data[0]
                data = [(torch.cat([x, x], dim=1), y), *data[1:]]
            try:
                ts.model_hessian_trace(model, nn.MSELoss(), data)
            except RuntimeError as err:
                torch.save({"error": f"{type(err).__name__}: {err}"}, out)
            return
        H = HessianOperator.from_model(model, nn.MSELoss(), data)
        V = probe_columns(H.shape[0])
        if not any(shards):  # no process holds a batch: every one is told so
            try:
                H @ V
            except ValueError as err:
                torch.save({"error": str(err)}, out)
            return
        if differs:
            H @ V
            try:
                H @ V
            except ValueError as err:
                torch.save({"error": str(err)}, out)
            return
        torch.save(
            {"product": H @ V, "num_samples": H.num_samples, "num_matvecs": H.num_matvecs}, out
        )
    finally:
        torch.distributed.destroy_process_group()


class WithBadBatch:
    """Batches, then one that is a triple (found only when a pass reaches it)."""

    def __init__(self, batches):
        self.batches = batches

    def __iter__(self):
        yield from self.batches
        x, y = self.batches[0]
        yield (x, y, y)


class Samples(torch.utils.data.IterableDataset):
    """The samples of ``batches``, streamed (no length); ``broken``: none can be read."""

    def __init__(self, batches, broken):
        self.batches, self.broken = batches, broken

    def __iter__(self):
        for x, y in self.batches:
            for i in range(len(x)):
                if self.broken:
                    raise OSError("cannot read sample")
                yield x[i], y[i]


class Unreadable(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, index):
        raise OSError("cannot read sample")


def loader_case(data, broken, stream, model):
    """The errors of a model trace over a DataLoader, and whether the global RNG was kept."""
    if stream:
        loader = torch.utils.data.DataLoader(Samples(data, broken), batch_size=2)
    else:
        good = torch.utils.data.TensorDataset(*(torch.cat(t) for t in zip(*data)))
        loader = torch.utils.data.DataLoader(Unreadable() if broken else good, batch_size=2)
    state = torch.get_rng_state()
    try:
        trace = ts.model_hessian_trace(model, nn.MSELoss(), loader, method="hutchinson")
        result = {"value": float(trace.value)}
    except (OSError, RuntimeError) as err:
        result = {"error": f"{type(err).__name__}: {err}"}
    return {**result, "rng kept": torch.equal(state, torch.get_rng_state())}


def groups_case(model, data):
    """A per-module Hutchinson trace, and the exact diagonal with its products."""
    options = {"groups": "module", "method": "hutchinson", "num_matvecs": 6}
    generator = torch.Generator().manual_seed(3)
    traces = ts.model_hessian_trace(model, nn.MSELoss(), data, generator=generator, **options)
    H = HessianOperator.from_model(model, nn.MSELoss(), data)
    diagonal = H.diagonal()
    return {
        "traces": {name: float(t.value) for name, t in traces.items()},
        "diagonal": diagonal,
        "products": H.num_matvecs,
    }


if __name__ == "__main__":
    main(
        int(sys.argv[1]),
        int(sys.argv[2]),
        int(sys.argv[3]),
        json.loads(sys.argv[4]),
        sys.argv[5],
        sys.argv[6] if len(sys.argv) > 6 else "",
    )
