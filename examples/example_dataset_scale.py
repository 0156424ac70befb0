"""The Hessian of a whole data set, streamed from a DataLoader, on one or several processes.

:meth:`HessianOperator.from_model` multiplies with the Hessian of the mean loss over every
sample of a data set. Each product streams over the batches of a ``DataLoader``, so memory
does not grow with the data set, and under :mod:`torch.distributed` each process streams
only its own shard and the products are summed across processes with one ``all_reduce``.

The script generates a regression data set, builds the operator, multiplies it with a few
probe vectors and checks the products against the dense Hessian of the loss on all data
concatenated into one batch. The same script runs on one process::

    python examples/example_dataset_scale.py --out results/

or on several, launched by ``torchrun``, which sets ``WORLD_SIZE``, ``RANK`` and the
rendezvous variables read by ``init_process_group``::

    torchrun --nproc_per_node=2 examples/example_dataset_scale.py --out results/

Each process then loads its shard through a ``DistributedSampler`` and every process ends
with the same products, those of the whole data set.
"""

# %%
# Imports and command line
# ------------------------
import argparse
import json
import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import torch_secorder as ts

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", type=Path, default=None, help="output directory (default: a temp dir)")
parser.add_argument("--samples", type=int, default=1200, help="samples in the data set")
parser.add_argument("--batch-size", type=int, default=100, help="samples per batch")
args = parser.parse_args()

# %%
# Processes
# ---------
# ``torchrun`` sets ``WORLD_SIZE`` and ``RANK``; without them this is a single process.
# The ``gloo`` backend runs on CPU; on GPUs use ``"nccl"`` and
# ``torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))``.
world_size = int(os.environ.get("WORLD_SIZE", "1"))
distributed = world_size > 1
if distributed:
    dist.init_process_group("gloo")
rank = dist.get_rank() if distributed else 0
out = args.out or Path(tempfile.mkdtemp(prefix="torch_secorder_dataset_scale_"))
out.mkdir(parents=True, exist_ok=True)

# %%
# Data and model
# --------------
# Every process generates the same data set and model from fixed seeds; the sampler then
# gives each process its shard. ``DistributedSampler`` pads the shards to equal sizes by
# repeating samples when the data set does not divide evenly, which would count those
# samples twice: here the number of samples is a multiple of the number of processes.
# (Unequal shards are fine for the operator; shard with ``torch.utils.data.Subset`` to get
# them without padding.)
if args.samples % world_size:
    raise SystemExit(f"--samples={args.samples} must be a multiple of {world_size} processes")
generator = torch.Generator().manual_seed(0)
inputs = torch.randn(args.samples, 6, generator=generator, dtype=torch.float64)
weights = torch.randn(6, 2, generator=generator, dtype=torch.float64)
targets = torch.tanh(inputs @ weights) + 0.1 * torch.randn(
    args.samples, 2, generator=generator, dtype=torch.float64
)
dataset = TensorDataset(inputs, targets)

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 2)).double()
loss_fn = nn.MSELoss()  # the mean over each batch: the operator is the mean-loss Hessian

sampler = DistributedSampler(dataset, shuffle=False) if distributed else None
loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)

# %%
# The operator over the data set
# ------------------------------
# Every product below passes over all batches of every process once, for all columns.
H = ts.HessianOperator.from_model(model, loss_fn, loader)
P = H.shape[0]
probes = torch.randn(P, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
products = H @ probes
curvature = (probes * products).sum(0) / (probes * probes).sum(0)  # Rayleigh quotients
if rank == 0:
    print(f"{world_size} process(es), {H.num_samples} samples, P = {P} parameters")
    print(f"products used: {H.num_matvecs}; Rayleigh quotients: {curvature.tolist()}")

# %%
# Check against the concatenated-data Hessian
# -------------------------------------------
# The dense Hessian of the mean loss on all samples as one batch (P = 74 here, so the
# matrix is small), computed on every process independently of the sharding.
dense = ts.model_hessian_matrix(model, loss_fn, inputs, targets)
expected = dense @ probes
torch.testing.assert_close(products, expected)
if H.num_samples != args.samples:
    raise AssertionError(f"the operator saw {H.num_samples} samples; expected {args.samples}")
if torch.linalg.eigvalsh(dense)[-1] < curvature.max() - 1e-9:
    raise AssertionError("a Rayleigh quotient exceeds the largest eigenvalue")

result = {
    "world_size": world_size,
    "rank": rank,
    "num_samples": H.num_samples,
    "num_matvecs": H.num_matvecs,
    "rayleigh_quotients": curvature.tolist(),
    "max_abs_error": (products - expected).abs().max().item(),
}
(out / f"dataset_scale_rank{rank}.json").write_text(json.dumps(result, indent=2))
if rank == 0:
    print(f"matches the concatenated-data Hessian; results in {out}")
if distributed:
    dist.destroy_process_group()
