"""A multi-input model: the tied LSTM language model on packed sequences of unequal lengths.

``model(tokens, lengths)`` packs unsorted sequences, the loss leaves padding out
(``ignore_index``), dropout is active (train mode); inputs are a tuple, the batch size is that
of the first tensor. The library's Hessians of one batch and of the data set are the
oracle's.
"""

import functools

import torch
from torch.testing import assert_close

import torch_secorder as ts
from tests.real import oracle
from tests.real.helpers import checked, reproducible
from tests.real.models import build, make_packed, sequence_loss

NAMES = ["encoder.weight", "rnn.bias_hh_l0", "decoder.bias"]


@functools.cache
def packed(mode):
    model, batches = make_packed(mode)
    hessians = [
        oracle.hessian(model, sequence_loss, [batch], NAMES, seeds=[b])
        for b, batch in enumerate(batches)
    ]
    sizes = [tokens.shape[0] for (tokens, _), _ in batches]
    data = sum(n * H for n, H in zip(sizes, hessians)) / sum(sizes)
    return model, batches, hessians[0], data


def test_packed_sequences():
    model, batches, H0, H = packed("train")
    inputs, targets = batches[0]
    matrix = reproducible(
        model, ts.model_hessian_matrix, model, sequence_loss, inputs, targets, params=NAMES
    )
    assert_close(matrix, H0)
    diagonal = checked(
        model, ts.model_hessian_diagonal, model, sequence_loss, inputs, targets, params=NAMES
    )
    assert_close(oracle.flat(diagonal), H0.diagonal())
    operator = checked(
        model, ts.HessianOperator.from_model, model, sequence_loss, batches, params=NAMES
    )
    assert_close(checked(model, operator.matmat, torch.eye(H.shape[0], dtype=H.dtype)), H)
    assert operator.num_samples == sum(tokens.shape[0] for (tokens, _), _ in batches)
    traces = reproducible(
        model,
        ts.model_hessian_trace,
        model,
        sequence_loss,
        batches,
        params=NAMES,
        groups="module",
        method="exact",
    )
    assert list(traces) == ["encoder", "rnn", "decoder"]
    sizes = [dict(model.named_parameters())[n].numel() for n in NAMES]
    bounds = torch.tensor([0, *sizes]).cumsum(0)
    blocks = {"encoder": [0], "rnn": [1], "decoder": [2]}
    for module, members in blocks.items():
        rows = torch.cat([torch.arange(bounds[i], bounds[i + 1]) for i in members])
        assert_close(traces[module].value, H[rows][:, rows].trace())


def test_padding_changes_the_matrix():
    """The packed model's Hessian is not that of the same tokens at full length."""
    model, batches, H0, _ = packed("train")
    (tokens, _), _ = batches[0]
    lengths = torch.full((tokens.shape[0],), tokens.shape[1])
    batch = ((tokens, lengths), build("lstm", "train").batch[1])
    full = oracle.hessian(model, sequence_loss, [batch], NAMES)
    assert_close(full, full.T)
    assert not torch.allclose(H0, full, rtol=1e-3)
