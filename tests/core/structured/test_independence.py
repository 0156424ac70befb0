"""The sets of the independence checks: every ordered pair of indices is told apart."""

import itertools

import pytest
import torch

from torch_secorder.core._structured.independence import count, membership


@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 7, 8, 9, 33, 128, 300])
def test_every_ordered_pair_has_a_set_holding_one_and_not_the_other(length):
    sets = membership(length, torch.device("cpu"))
    assert sets.shape == (count(length), length)
    for a, b in itertools.permutations(range(length), 2):
        assert (sets[:, b] & ~sets[:, a]).any(), (a, b)


def test_the_number_of_checks():
    # the smallest m with C(m, m // 2) >= n
    assert [count(n) for n in (1, 2, 3, 4, 6, 7, 10, 11, 20, 70, 71, 252, 253, 1024)] == [
        0, 2, 3, 4, 4, 5, 5, 6, 6, 8, 9, 10, 11, 13
    ]  # fmt: skip


def test_one_bit_per_index_would_miss_a_direction():
    # what the sets fix: with S_k = {bit k of the index is 0} alone, index 0 (all bits 0) is in
    # every set, so no set holds another index and not 0
    bits = torch.stack([(torch.arange(8) >> k) & 1 == 0 for k in range(3)])
    assert not any((bits[:, b] & ~bits[:, 0]).any() for b in range(1, 8))
