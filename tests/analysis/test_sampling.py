import pytest
import torch

from torch_secorder.analysis import _sampling
from torch_secorder.analysis._sampling import (
    DEFAULT_SEED,
    gaussian,
    make_generator,
    rademacher,
    rademacher_columns,
    spawn,
)

CPU = torch.device("cpu")


def test_default_generator_is_fresh_and_fixed():
    a, b = make_generator(None), make_generator(None)
    assert a is not b
    assert torch.equal(a.get_state(), torch.Generator().manual_seed(DEFAULT_SEED).get_state())
    given = torch.Generator()
    assert make_generator(given) is given


def test_rademacher_signs_and_balance():
    z = rademacher(torch.Generator().manual_seed(0), (4000,), torch.float64, CPU)
    assert z.dtype == torch.float64
    assert set(z.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(z.mean())) < 4 / 4000**0.5


@pytest.mark.parametrize("short", [True, False])
@pytest.mark.parametrize("n", [1, 8, 13, 70001])
def test_rademacher_signs_are_the_bits_of_random_bytes(monkeypatch, short, n):
    # each row: the bits of its ceil(n/8) bytes, least significant first, as 2 bit - 1
    if not short:
        monkeypatch.setattr(_sampling, "_SHORT", 0)
    z = rademacher(torch.Generator().manual_seed(4), (3, n), torch.float64, CPU)
    codes = torch.randint(0, 256, (3, -(-n // 8)), generator=torch.Generator().manual_seed(4))
    bits = torch.stack([(codes >> shift) % 2 for shift in range(8)], dim=-1)
    assert torch.equal(z, 2.0 * bits.reshape(3, -1)[:, :n].double() - 1)


def test_rademacher_writes_into_out_and_takes_empty_shapes():
    out = torch.full((2, 20), 7.0)
    z = rademacher(torch.Generator().manual_seed(5), (2, 20), torch.float32, CPU, out=out)
    assert z is out
    assert torch.equal(z, rademacher(torch.Generator().manual_seed(5), (2, 20), torch.float32, CPU))
    assert rademacher(torch.Generator(), (0, 5), torch.float32, CPU).shape == (0, 5)
    assert rademacher(torch.Generator(), (4, 0), torch.float32, CPU).shape == (4, 0)
    assert rademacher(torch.Generator(), (), torch.float32, CPU).abs().item() == 1


def test_columns_do_not_depend_on_chunking():
    whole = rademacher_columns(torch.Generator().manual_seed(1), 50, 9, torch.float32, CPU)
    g = torch.Generator().manual_seed(1)
    parts = [rademacher_columns(g, 50, k, torch.float32, CPU) for k in (4, 4, 1)]
    assert whole.shape == (50, 9)
    assert torch.equal(whole, torch.cat(parts, dim=1))


def test_gaussian_dtypes():
    g = torch.Generator().manual_seed(0)
    assert gaussian(g, (3, 2), torch.float64, CPU).dtype == torch.float64
    assert gaussian(g, (3, 2), torch.bfloat16, CPU).dtype == torch.bfloat16
    x = gaussian(torch.Generator().manual_seed(2), (20000,), torch.float64, CPU)
    assert abs(float(x.std()) - 1) < 0.05


def test_spawn_is_deterministic_and_prefix_stable():
    three = spawn(torch.Generator().manual_seed(3), 3)
    two = spawn(torch.Generator().manual_seed(3), 2)
    draw = [torch.randn(2, generator=g) for g in three]
    assert torch.equal(draw[0], torch.randn(2, generator=two[0]))
    assert torch.equal(draw[1], torch.randn(2, generator=two[1]))
    assert not torch.equal(draw[0], draw[1])


def test_global_rng_is_untouched():
    state = torch.get_rng_state()
    g = make_generator(None)
    rademacher_columns(g, 10, 3, torch.float64, CPU)
    gaussian(g, (5,), torch.float32, CPU)
    spawn(g, 2)
    assert torch.equal(torch.get_rng_state(), state)
