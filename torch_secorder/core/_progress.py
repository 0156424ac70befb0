"""Long exact computations say so: a warning with their cost up front, a progress bar on request.

The cost of an exact diagonal or matrix is known before its products run (one per parameter
element, or a layer rule's count); above :data:`LONG_PRODUCTS` products a call warns once,
naming the count and the faster alternatives. ``progress=True`` shows a ``tqdm`` bar over
the products (the ``progress`` extra).
"""

import contextlib
import warnings
from collections.abc import Iterator

from torch_secorder.core._autograd import GradientGraph

LONG_PRODUCTS = 100_000
"""Products above which an exact computation warns (minutes to hours on a CPU)."""


def require_tqdm(fname: str) -> None:
    """Raise ``ImportError`` naming ``fname`` unless ``tqdm`` is installed."""
    try:
        import tqdm  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{fname}: progress=True needs tqdm; install it with "
            "pip install 'torch-secorder[progress]'."
        ) from err


def warn_if_long(fname: str, products: int, what: str, hint: str) -> None:
    """Warn (``UserWarning``) when ``products`` exceeds :data:`LONG_PRODUCTS`."""
    if products > LONG_PRODUCTS:
        warnings.warn(
            f"{fname}: the exact {what} takes {products:,} Hessian-vector products, which can "
            f"take long; progress=True shows how far it is. {hint}",
            UserWarning,
            stacklevel=3,
        )


@contextlib.contextmanager
def counted(graph: GradientGraph, products: int, progress: bool, what: str) -> Iterator[None]:
    """Show a progress bar over the graph's next ``products`` products, if ``progress``."""
    if not progress:
        yield
        return
    from tqdm.auto import tqdm

    bar = tqdm(total=products, desc=f"exact {what}", unit="product", leave=False)
    graph.on_products = bar.update
    try:
        yield
    finally:
        graph.on_products = None
        bar.close()
