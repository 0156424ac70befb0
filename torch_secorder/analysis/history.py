r"""The records of a :class:`~torch_secorder.CurvatureMonitor`: a history to save, load and plot.

Each check of the monitor adds one :class:`CurvatureRecord` per quantity it computed: the top
eigenvalues of the Hessian (``"eigenvalue"``, one record per eigenvalue, ``index`` 0 the
largest), of the preconditioned Hessian :math:`P^{-1}H` (``"preconditioned_eigenvalue"``), the
trace (``"trace"``) and the optimizer's stability threshold (``"threshold"``), each for the
whole selection (``group=None``) or one group of ``groups=``. A
:class:`CurvatureHistory` holds them in order; it writes them as CSV (one row per record, the
fields as columns) or JSON (a list of objects), reads either back exactly (floats are written
with as many digits as they need), and plots them as the edge-of-stability papers draw them.
"""

import csv
import json
import math
import os
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, fields
from typing import Any

from torch_secorder._checks import check_choice

__all__ = ["CurvatureHistory", "CurvatureRecord"]

QUANTITIES = ("eigenvalue", "preconditioned_eigenvalue", "trace", "threshold")
"""What a record can hold."""

FORMAT = "torch_secorder.CurvatureHistory"
"""The ``format`` field of the JSON files."""

VERSION = 1


@dataclass(frozen=True)
class CurvatureRecord:
    r"""One quantity measured at one check of a :class:`~torch_secorder.CurvatureMonitor`.

    Attributes:
        step: Optimizer steps taken before the check.
        quantity: ``"eigenvalue"`` (of the Hessian :math:`H`), ``"preconditioned_eigenvalue"``
            (of :math:`P^{-1}H`), ``"trace"`` (of :math:`H`) or ``"threshold"`` (the
            optimizer's stability threshold for the largest eigenvalue of :math:`P^{-1}H`, or
            of :math:`H` for SGD).
        value: The value.
        residual: For an eigenvalue, the residual norm :math:`\|Hx - \theta x\|` of its unit
            eigenvector (a bound on its error); for a trace, its standard error (``0`` when
            exact); ``0`` for a threshold.
        num_matvecs: Hessian-vector products the computation used, counted once: on the
            record of the largest eigenvalue where one computation gives several (``0`` on
            the others), so that the records' counts add up to the monitor's.
        seconds: Wall-clock seconds of the computation; quantities computed together (the
            eigenvalues of the whole selection and of every group) share theirs.
        group: The group of ``groups=`` it belongs to, or ``None`` for the whole selection.
        index: Which eigenvalue (``0`` the largest); ``0`` for the other quantities.
        converged: Whether the eigenvalue met the tolerance within the budget (``True`` for
            the other quantities).
    """

    step: int
    quantity: str
    value: float
    residual: float
    num_matvecs: int
    seconds: float
    group: str | None = None
    index: int = 0
    converged: bool = True


FIELDS = [f.name for f in fields(CurvatureRecord)]


class CurvatureHistory:
    """The records of a curvature monitor, in the order they were made.

    A sequence of :class:`CurvatureRecord` (``len``, iteration, indexing) with selection by
    quantity and group, saving to and loading from CSV and JSON, and a plot.

    Args:
        records: Initial records.

    Example:
        >>> from torch_secorder import CurvatureHistory, CurvatureRecord
        >>> history = CurvatureHistory([
        ...     CurvatureRecord(0, "eigenvalue", 3.0, 1e-6, 20, 0.5),
        ...     CurvatureRecord(0, "threshold", 20.0, 0.0, 0, 0.0),
        ...     CurvatureRecord(10, "eigenvalue", 4.5, 1e-6, 8, 0.2),
        ... ])
        >>> history.series("eigenvalue")
        ([0, 10], [3.0, 4.5])
        >>> history.num_matvecs
        28
    """

    def __init__(self, records: Iterable[CurvatureRecord] = ()) -> None:
        self.records: list[CurvatureRecord] = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __iter__(self) -> Iterator[CurvatureRecord]:
        return iter(self.records)

    def __getitem__(self, index: int) -> CurvatureRecord:
        return self.records[index]

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, CurvatureHistory):
            return NotImplemented
        return len(self) == len(other) and all(map(_same, self.records, other.records))

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        steps = sorted({r.step for r in self.records})
        span = f", steps {steps[0]}..{steps[-1]}" if steps else ""
        return f"CurvatureHistory({len(self)} records, {len(steps)} checks{span})"

    def extend(self, records: Iterable[CurvatureRecord]) -> None:
        """Append records."""
        self.records.extend(records)

    @property
    def num_matvecs(self) -> int:
        """Hessian-vector products of all records together."""
        return sum(r.num_matvecs for r in self.records)

    @property
    def groups(self) -> list[str]:
        """The groups that have records, in order of appearance."""
        return list(dict.fromkeys(r.group for r in self.records if r.group is not None))

    def select(
        self, quantity: str | None = None, *, group: str | None = None, index: int | None = None
    ) -> list[CurvatureRecord]:
        """The records of one quantity (all quantities for ``None``) of one group, in order.

        Args:
            quantity: One of ``"eigenvalue"``, ``"preconditioned_eigenvalue"``, ``"trace"``,
                ``"threshold"``, or ``None`` for all.
            group: The group's name; ``None`` selects the whole selection's records.
            index: Which eigenvalue; ``None`` for all.

        Returns:
            The matching records.
        """
        return [
            r
            for r in self.records
            if (quantity is None or r.quantity == quantity)
            and r.group == group
            and (index is None or r.index == index)
        ]

    def series(
        self, quantity: str = "eigenvalue", *, group: str | None = None, index: int = 0
    ) -> tuple[list[int], list[float]]:
        """Steps and values of one quantity of one group, e.g. the sharpness over training.

        Args:
            quantity: As for :meth:`select`; default the top eigenvalue.
            group: As for :meth:`select`.
            index: Which eigenvalue (``0``: the largest).

        Returns:
            ``(steps, values)``, two lists.
        """
        chosen = self.select(quantity, group=group, index=index)
        return [r.step for r in chosen], [r.value for r in chosen]

    # ------------------------------------------------------------------------- files

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the records as CSV: a header of the field names, one row per record.

        The group of the whole selection is an empty cell, that of the parameters the model
        owns itself (named ``""``) the two characters ``""``; floats are written with the
        shortest representation that reads back to the same number.

        Args:
            path: The file to write.
        """
        with open(path, "w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(FIELDS)
            for record in self.records:
                row = asdict(record)
                row["group"] = _CSV_GROUPS.get(record.group, record.group)
                writer.writerow([_cell(row[name]) for name in FIELDS])

    def to_json(self, path: str | os.PathLike[str]) -> None:
        """Write the records as JSON: ``{"format", "version", "records": [{field: value}]}``.

        Args:
            path: The file to write.
        """
        document = {
            "format": FORMAT,
            "version": VERSION,
            "records": [
                {name: _json_number(value) for name, value in asdict(r).items()}
                for r in self.records
            ],
        }
        with open(path, "w") as file:
            json.dump(document, file, indent=1, allow_nan=False)
            file.write("\n")

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> "CurvatureHistory":
        """Read a history written by :meth:`to_csv` (``.csv``) or :meth:`to_json` (``.json``).

        Args:
            path: The file, its format told by its suffix.

        Returns:
            The history, equal to the one written.

        Raises:
            ValueError: If the suffix is neither ``.csv`` nor ``.json``, or the file holds no
                curvature history.
        """
        name = os.fspath(path)
        suffix = os.path.splitext(name)[1].lower()
        if suffix == ".json":
            return cls(_from_json(name))
        if suffix == ".csv":
            return cls(_from_csv(name))
        raise ValueError(f"CurvatureHistory.load: path must end in .csv or .json; got {name!r}.")

    # ------------------------------------------------------------------------- plot

    def plot(
        self,
        ax: Any = None,
        *,
        quantity: str | None = None,
        groups: bool = True,
        color: str | None = None,
        label: str | None = None,
        log: bool = False,
        path: Any = None,
    ) -> Any:
        r"""Plot the sharpness against the step, with the stability threshold as a line.

        Draws the largest eigenvalue of ``quantity`` (the others of ``k > 1`` fainter), the
        optimizer's stability threshold as a dashed line where it applies to it (following
        the learning rate where a scheduler changed it): to :math:`P^{-1}H` where that was
        recorded (adaptive optimizers), else to :math:`H` (SGD); and with ``groups`` each
        group's largest eigenvalue as a thin line, as the edge-of-stability papers draw
        them. Several histories can share one ``ax`` (one ``color`` and ``label`` each).
        Without ``ax``, a new figure is made: with pyplot when ``path`` is ``None`` (so it
        shows in notebooks), else as a standalone :class:`matplotlib.figure.Figure` that is
        saved and not registered with pyplot.

        Args:
            ax: Matplotlib ``Axes`` to draw on; ``None`` creates a figure.
            quantity: ``"eigenvalue"`` (of :math:`H`) or ``"preconditioned_eigenvalue"``
                (of :math:`P^{-1}H`); ``None`` picks the latter where recorded.
            groups: Draw the per-group curves (of :math:`H`'s blocks).
            color: Matplotlib color of the curve and its threshold (default ``"C0"`` for
                :math:`H`, ``"C1"`` for :math:`P^{-1}H`).
            label: Prefix of the legend entries (e.g. the learning rate of the run).
            log: Logarithmic value axis.
            path: Save the figure as PNG to this path (a ``str`` or ``os.PathLike``).

        Returns:
            The ``Axes`` drawn on (its figure is ``ax.figure``).

        Raises:
            ValueError: If ``quantity`` is not one of the two eigenvalue quantities.
            ImportError: If matplotlib is not installed (the ``plot`` extra).
        """
        fname = "CurvatureHistory.plot"
        preconditioned = bool(self.select("preconditioned_eigenvalue"))
        if quantity is None:
            quantity = "preconditioned_eigenvalue" if preconditioned else "eigenvalue"
        check_choice(fname, "quantity", quantity, ("eigenvalue", "preconditioned_eigenvalue"))
        from torch_secorder.analysis.plot import _matplotlib

        _matplotlib(fname)
        if ax is None:
            if path is None:
                import matplotlib.pyplot as plt

                _, ax = plt.subplots()
            else:
                from matplotlib.figure import Figure

                ax = Figure().add_subplot()
        main = quantity == "eigenvalue"
        color = color or ("C0" if main else "C1")
        prefix = f"{label}: " if label else ""
        name = r"$\lambda_{\max}(H)$" if main else r"$\lambda_{\max}(P^{-1}H)$"
        indices = sorted({r.index for r in self.select(quantity)})
        for index in indices:
            steps, values = self.series(quantity, index=index)
            extra = f"{prefix}eigenvalues 2..{len(indices)}" if index == 1 else None
            ax.plot(
                steps,
                values,
                color=color,
                alpha=1.0 if index == 0 else 0.4,
                linewidth=1.5 if index == 0 else 0.8,
                label=prefix + name if index == 0 else extra,
            )
        if groups and main:
            for number, group in enumerate(self.groups):
                steps, values = self.series("eigenvalue", group=group)
                if steps:
                    ax.plot(
                        steps,
                        values,
                        color=f"C{2 + number % 8}",
                        linewidth=0.8,
                        label=f"{prefix}{group or '(root)'} (own block)",
                    )
        steps, values = self.series("threshold")
        if steps and main != preconditioned:
            ax.plot(
                steps,
                values,
                color=color,
                linestyle="--",
                linewidth=1.0,
                drawstyle="steps-post",
                label=f"{prefix}stability threshold",
            )
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("eigenvalue")
        ax.legend(fontsize="small")
        if path is not None:
            ax.figure.savefig(path, format="png", dpi=150, bbox_inches="tight")
        return ax


def _same(a: CurvatureRecord, b: CurvatureRecord) -> bool:
    """Records equal field by field, NaN equal to NaN (an undefined standard error)."""
    return all(
        x == y
        or (isinstance(x, float) and isinstance(y, float) and math.isnan(x) and math.isnan(y))
        for x, y in zip(asdict(a).values(), asdict(b).values())
    )


def _cell(value: object) -> str:
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _record(fname: str, row: dict[str, Any]) -> CurvatureRecord:
    """A record from a dict of fields as read from a file, with types restored."""
    missing = [name for name in FIELDS if name not in row]
    if missing:
        raise ValueError(
            f"{fname}: a record lacks the fields {missing}; expected the fields {FIELDS} of a "
            "history written by CurvatureHistory.to_csv or to_json."
        )
    group = row["group"]
    converged = row["converged"]
    return CurvatureRecord(
        step=int(row["step"]),
        quantity=str(row["quantity"]),
        value=float(row["value"]),
        residual=float(row["residual"]),
        num_matvecs=int(row["num_matvecs"]),
        seconds=float(row["seconds"]),
        group=None if group is None else str(group),
        index=int(row["index"]),
        converged=converged if isinstance(converged, bool) else converged == "True",
    )


_CSV_GROUPS = {None: "", "": '""'}
"""Groups whose CSV cells are not their names: the whole selection, the model's own."""


def _from_csv(path: str) -> list[CurvatureRecord]:
    names = {cell: group for group, cell in _CSV_GROUPS.items()}
    with open(path, newline="") as file:
        rows = list(csv.DictReader(file))
    for row in rows:
        row["group"] = names.get(row.get("group"), row.get("group"))
    return [_record("CurvatureHistory.load", row) for row in rows]


def _json_number(value: object) -> object:
    """A number that is not finite as the string ``float`` reads back ("inf", "nan").

    Standard JSON has no such numbers.
    """
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


def _from_json(path: str) -> list[CurvatureRecord]:
    with open(path) as file:
        document = json.load(file)
    if not isinstance(document, dict) or document.get("format") != FORMAT:
        raise ValueError(
            f"CurvatureHistory.load: {path!r} holds no curvature history; expected a JSON "
            f"object with format {FORMAT!r}, as CurvatureHistory.to_json writes."
        )
    return [_record("CurvatureHistory.load", row) for row in document["records"]]
