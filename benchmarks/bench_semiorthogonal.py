"""Semi-orthogonal Lanczos bases against orthogonal ones: products and convergence.

``top_eigenvalues`` keeps the first basis of a search semi-orthogonal on operators of 1 MiB
vectors or more (``analysis/_orthogonality.py``). Here both ways run on the same searches,
the semi-orthogonal one forced (``SEMIORTHOGONAL_BYTES`` 0) and turned off (a size no operator
reaches): diagonal operators of 131,072 entries (``--size``) with four spectra (a few large
eigenvalues over a bulk in [-1, 1]; uniform in [-1, 1]; eight outliers over a Gaussian bulk;
a signed power law 1/i), ``k`` = 1 and 5, the three ends, two seeds, float32 and float64:
96 searches, each with ``max_matvecs=2000`` and the default ``tol``. Printed per search: the
products and whether it converged, each way, and the largest relative error of the
eigenvalues; marked where the semi-orthogonal search converged less or took more than 1.1
times the products (plus two); then the counts.

Usage::

    python benchmarks/bench_semiorthogonal.py            # about 5 minutes on one core
    python benchmarks/bench_semiorthogonal.py --quick    # 8,192 entries, float64: seconds

Not collected by pytest.
"""

import argparse
import warnings

import torch
from torch import Tensor

import torch_secorder as ts
from torch_secorder.analysis import _lanczos


class Diagonal:
    """``diag(d)`` behind the operator protocol."""

    def __init__(self, d: Tensor) -> None:
        self.d = d
        self.shape = (len(d), len(d))
        self.dtype = d.dtype
        self.device = d.device

    def matmat(self, V: Tensor) -> Tensor:
        return self.d[:, None] * V


def spectra(n: int, dtype: torch.dtype) -> dict[str, Tensor]:
    g = torch.Generator().manual_seed(11)
    u = torch.rand(n, generator=g, dtype=torch.float64)
    dominant = u * 2 - 1
    dominant[:5] = torch.tensor([100.0, 60, 40, 25, 15])
    outliers = torch.randn(n, generator=g, dtype=torch.float64) * 0.1
    outliers[:8] = torch.tensor([5.0, 4.9, 4.8, -3, -2.9, 2, 1.9, -1])
    power = torch.arange(1, n + 1, dtype=torch.float64) ** -1.0 * torch.where(u < 0.1, -0.3, 1.0)
    found = {"dominant": dominant, "uniform": u * 2 - 1, "outliers": outliers, "powerlaw": power}
    return {name: d.to(dtype) for name, d in found.items()}


def search(
    d: Tensor, k: int, which: str, seed: int, semiorthogonal: bool
) -> tuple[int, bool, float]:
    """``(products, converged, largest relative eigenvalue error)``."""
    _lanczos.SEMIORTHOGONAL_BYTES = 0 if semiorthogonal else 2**62
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (non-convergence is counted, not warned)
        result = ts.top_eigenvalues(
            Diagonal(d),
            k=k,
            which=which,
            max_matvecs=2000,
            generator=torch.Generator().manual_seed(seed),
        )
    ends = {
        "largest": d.sort(descending=True).values,
        "smallest": d.sort().values,
        "magnitude": d[d.abs().argsort(descending=True)],
    }
    truth = ends[which][:k].double()
    error = float(((result.eigenvalues.double() - truth).abs() / truth.abs()).max())
    return result.num_matvecs, result.converged, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=131072, help="entries of the operators")
    parser.add_argument("--quick", action="store_true", help="8,192 entries, float64 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    size = 8192 if args.quick else args.size
    dtypes = [torch.float64] if args.quick else [torch.float32, torch.float64]
    same = fewer = more = lost = total = 0
    for dtype in dtypes:
        for name, d in spectra(size, dtype).items():
            for k in (1, 5):
                for which in ("largest", "smallest", "magnitude"):
                    for seed in (0, 1):
                        full = search(d, k, which, seed, semiorthogonal=False)
                        semi = search(d, k, which, seed, semiorthogonal=True)
                        total += 1
                        same += semi[0] == full[0]
                        fewer += semi[0] < full[0]
                        more += semi[0] > full[0]
                        lost += full[1] and not semi[1]
                        worse = (full[1] and not semi[1]) or semi[0] > 1.1 * full[0] + 2
                        print(
                            f"{str(dtype)[6:]:8s} {name:9s} k={k} {which:9s} seed={seed} "
                            f"orthogonal {full[0]:4d} {full[1]!s:5s} {full[2]:.1e}  "
                            f"semi-orthogonal {semi[0]:4d} {semi[1]!s:5s} {semi[2]:.1e}"
                            + ("  <<<" if worse else ""),
                            flush=True,
                        )
    print(
        f"{total} searches: the same products in {same}, fewer in {fewer}, more in {more}; "
        f"converged orthogonal but not semi-orthogonal: {lost}"
    )


if __name__ == "__main__":
    main()
