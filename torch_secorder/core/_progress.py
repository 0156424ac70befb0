"""Long computations say so: a warning with their cost up front, a progress bar on request.

The cost of an exact diagonal or matrix is known before its products run (one per parameter
element, or the plan's count), and so is an analysis's budget. A call warns once when it
plans more than :data:`LONG_PRODUCTS` products, or when its time, estimated from the time per
product of its second chunk of products (the first also pays for setting up), passes
:data:`LONG_SECONDS` for at least :data:`TIMED_PRODUCTS` products; the warning names the count,
the estimate and the faster alternatives, at the user's line that called the library.
``progress=True`` shows a ``tqdm`` bar over the products with its rate and time left (the
``progress`` extra). Warnings never change a result.
"""

import contextlib
import os
import sys
import time
import warnings
from collections.abc import Iterator
from types import FrameType

from torch_secorder.core._autograd import GradientGraph

LONG_PRODUCTS = 100_000
"""Products above which an exact computation warns (minutes to hours on a CPU)."""

LONG_SECONDS = 300.0
"""Estimated seconds above which a computation of many products warns."""

TIMED_PRODUCTS = 1_000
"""Fewest products for the time-based warning (a few products are never long enough to warn
about, whatever the first one took)."""


def require_tqdm(fname: str) -> None:
    """Raise ``ImportError`` naming ``fname`` unless ``tqdm`` is installed."""
    try:
        import tqdm  # noqa: F401
    except ImportError as err:
        raise ImportError(
            f"{fname}: progress=True needs tqdm; install it with "
            "pip install 'torch-secorder[progress]'."
        ) from err


_PACKAGE = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
_CONTEXTLIB = os.path.abspath(contextlib.__file__)


def _inside(frame: FrameType) -> bool:
    """Whether ``frame`` runs this package's code (or a context manager's, on its behalf)."""
    filename = os.path.abspath(frame.f_code.co_filename)
    return filename.startswith(_PACKAGE) or filename == _CONTEXTLIB


def outside_stacklevel() -> int:
    """The ``stacklevel`` of the user's line for a warning raised by this function's caller.

    That is the first frame outside this package, however deep the library's calls go.
    """
    frame, level = sys._getframe(2), 2
    while frame is not None and _inside(frame):
        frame, level = frame.f_back, level + 1
    return level


def _duration(seconds: float) -> str:
    return f"{seconds / 60:.0f} minutes" if seconds < 7200 else f"{seconds / 3600:.1f} hours"


def warn_if_long(
    fname: str,
    products: int,
    what: str,
    hint: str,
    seconds_per_product: float | None = None,
) -> None:
    """Warn (``UserWarning``) before ``products`` products that will take long.

    Long means more than :data:`LONG_PRODUCTS` products, or, given the seconds one product
    takes, at least :data:`TIMED_PRODUCTS` products and more than :data:`LONG_SECONDS`.
    """
    seconds = None if seconds_per_product is None else products * seconds_per_product
    timed = seconds is not None and products >= TIMED_PRODUCTS and seconds > LONG_SECONDS
    if products <= LONG_PRODUCTS and not timed:
        return
    long = seconds is not None and seconds >= 60
    estimate = f" (about {_duration(seconds)} at the time measured)" if long else ""  # type: ignore[arg-type]
    warnings.warn(
        f"{fname}: the {what} takes {products:,} Hessian-vector products{estimate}, which can "
        f"take long; progress=True shows how far it is. {hint}",
        UserWarning,
        stacklevel=outside_stacklevel(),
    )


@contextlib.contextmanager
def counted(
    graph: GradientGraph, fname: str, products: int, progress: bool, what: str, hint: str
) -> Iterator[None]:
    """Meter the graph's next ``products`` products (:class:`Meter`).

    The cost warning comes from their measured rate; a progress bar shows if ``progress``.
    """
    with Meter(fname, products, progress, what, hint) as meter:
        graph.on_products = meter.update
        try:
            yield
        finally:
            graph.on_products = None


class Meter:
    """Products done of a planned total: a progress bar on request, and the cost warning.

    The warning comes only where ``total`` is what the computation will take (not a cap it
    may stop short of, as an eigen-solver's budget): up front above :data:`LONG_PRODUCTS`,
    else at the second :meth:`update`, from the time per product of the products since the
    first (the first products also pay for setting up, a data pass's first graph).

    Args:
        fname: Public function name, for messages and the bar.
        total: Products planned (at most).
        progress: Show a ``tqdm`` bar.
        what: What is computed, for the warning ("the analysis takes ...").
        hint: What to do instead, for the warning.
        certain: Whether ``total`` is what the computation takes (else: at most).
    """

    def __init__(
        self,
        fname: str,
        total: int,
        progress: bool,
        what: str,
        hint: str,
        *,
        certain: bool = True,
    ) -> None:
        self.fname, self.total, self.what, self.hint = fname, total, what, hint
        self.bar = None
        if progress:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, desc=fname, unit="product", leave=False)
        self.done = 0
        self.first: tuple[float, int] | None = None  # time and count at the first update
        self.checked = not certain
        if certain and total > LONG_PRODUCTS:  # long whatever the rate: say so up front
            warn_if_long(fname, total, what, hint)
            self.checked = True

    def update(self, products: int) -> None:
        """Count ``products`` more; warn once if the whole will take long."""
        self.done += products
        if self.bar is not None:
            self.bar.update(products)
        if self.checked:
            return
        now = time.perf_counter()
        if self.first is None:
            self.first = (now, self.done)
            return
        self.checked = True
        seconds, since = now - self.first[0], self.done - self.first[1]
        per_product = seconds / since if since else 0.0
        warn_if_long(self.fname, self.total, self.what, self.hint, per_product)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> "Meter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
