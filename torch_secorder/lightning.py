"""A Lightning callback that monitors the curvature of the LightningModule being trained.

:class:`CurvatureCallback` runs a :class:`~torch_secorder.CurvatureMonitor` beside a
``lightning`` ``Trainer``: it builds the monitor on the module when fitting starts (with the
trainer's optimizer, for the stability threshold), counts the trainer's optimizer steps,
checks every ``every`` of them, sends the records to the trainer's loggers and writes the
history to a file when fitting ends. Lightning is an optional dependency (the ``lightning``
extra): importing this module does not import it; making a callback does.
"""

import inspect
import os
import sys
from typing import Any

from torch_secorder._checks import check_bool, check_int, type_name
from torch_secorder.analysis.history import CurvatureHistory, CurvatureRecord
from torch_secorder.analysis.monitor import CurvatureMonitor

__all__ = ["CurvatureCallback"]

FNAME = "CurvatureCallback"

_CLASSES: dict[tuple[type, ...], type] = {}
"""The callback class combined with Lightning's ``Callback`` base classes, made once each."""


def _callback_bases() -> tuple[type, ...]:
    """Lightning's ``Callback`` base classes, imported on first use.

    That of ``lightning.pytorch``, and that of ``pytorch_lightning`` where that package is in
    use (imported, or the only one installed).

    Raises:
        ImportError: If neither package is installed.
    """
    bases: list[type] = []
    try:
        import lightning.pytorch

        bases.append(lightning.pytorch.Callback)
    except ImportError:
        pass
    standalone = sys.modules.get("pytorch_lightning")
    if standalone is None and not bases:
        try:
            import pytorch_lightning as standalone
        except ImportError:
            standalone = None
    if standalone is not None and standalone.Callback not in bases:
        bases.append(standalone.Callback)
    if not bases:
        raise ImportError(
            f"{FNAME} needs Lightning; install it with pip install 'torch-secorder[lightning]'."
        )
    return tuple(bases)


def _make(loss_fn: Any, data: Any, options: dict[str, Any]) -> "CurvatureCallback":
    """Rebuild a callback (for pickling and copying)."""
    return CurvatureCallback(loss_fn, data, **options)


class CurvatureCallback:
    r"""Monitor the Hessian's top eigenvalues while a Lightning ``Trainer`` fits a module.

    When fitting starts, a :class:`~torch_secorder.CurvatureMonitor` is made on the
    ``LightningModule`` (its forward pass ``module(inputs)`` and ``loss_fn(outputs,
    targets)`` define the loss) and, with ``optimizer=True``, the trainer's optimizer (the
    only one). After every training batch the callback counts the optimizer steps the trainer
    took (``trainer.global_step``, so gradient accumulation is counted right) and the monitor
    checks every ``every`` of them; each check's records go to the trainer's loggers as
    ``curvature/<quantity>`` (``curvature/<group>/<quantity>`` for a group, ``_<i>`` appended
    for the ``i``-th eigenvalue beyond the first), and when fitting ends the history is
    written to ``path``. :attr:`history` holds it meanwhile; a checkpoint keeps it
    (``state_dict``), so a resumed fit continues it.

    The class is usable as a ``lightning.pytorch.Callback`` (and a
    ``pytorch_lightning.Callback`` where that package is in use): making one imports
    Lightning, importing this module does not.

    Args:
        loss_fn: ``loss_fn(outputs, targets)`` returning the mean loss of a batch, with
            ``outputs = module(inputs)``.
        data: The fixed batch or fixed collection of batches whose Hessian is monitored (on
            several processes, each process's shard), as for
            :class:`~torch_secorder.CurvatureMonitor`.
        every: Check every ``every`` optimizer steps.
        optimizer: Read the trainer's optimizer for the stability threshold and the
            preconditioned Hessian; ``False`` records the eigenvalues only.
        path: Write the history to this ``.csv`` or ``.json`` file when fitting ends;
            ``None`` writes nothing.
        **options: Further keyword arguments of :class:`~torch_secorder.CurvatureMonitor`
            (``k``, ``params``, ``groups``, ``trace``, ``tol``, ``max_matvecs``,
            ``warm_start``, ...).

    Attributes:
        monitor: The :class:`~torch_secorder.CurvatureMonitor`, once fitting has started.

    Raises:
        ImportError: If Lightning is not installed (the ``lightning`` extra).
        TypeError: If ``every``, ``optimizer`` or ``path`` has the wrong type, or an option is
            not one of the monitor's; the monitor's own checks run when fitting starts.
        ValueError: If ``every`` is less than 1 or ``path`` does not end in ``.csv`` or
            ``.json``.

    Example:
        >>> import lightning
        >>> import torch
        >>> class Regression(lightning.LightningModule):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.layer = torch.nn.Linear(2, 1, bias=False).double()
        ...     def forward(self, x):
        ...         return self.layer(x)
        ...     def training_step(self, batch, _):
        ...         x, y = batch
        ...         return torch.nn.functional.mse_loss(self(x), y)
        ...     def configure_optimizers(self):
        ...         return torch.optim.SGD(self.parameters(), lr=0.1)
        >>> x = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
        >>> y = torch.zeros(2, 1, dtype=torch.float64)
        >>> loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y),
        ...                                      batch_size=2)
        >>> callback = CurvatureCallback(torch.nn.MSELoss(), (x, y), every=2)
        >>> trainer = lightning.Trainer(max_steps=4, callbacks=[callback], logger=False,
        ...                             enable_checkpointing=False, enable_progress_bar=False,
        ...                             enable_model_summary=False, accelerator="cpu")
        >>> trainer.fit(Regression(), loader)
        >>> callback.history.series("eigenvalue")
        ([2, 4], [4.0, 4.0])
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> "CurvatureCallback":
        """Make an instance of this class combined with Lightning's ``Callback``."""
        bases = tuple(b for b in _callback_bases() if not issubclass(cls, b))
        if bases:
            key = (cls, *bases)
            if key not in _CLASSES:
                namespace = {"__module__": cls.__module__, "__doc__": cls.__doc__}
                _CLASSES[key] = type(cls.__name__, key, namespace)
            cls = _CLASSES[key]
        return super().__new__(cls)

    def __init__(
        self,
        loss_fn: Any,
        data: Any,
        *,
        every: int = 1,
        optimizer: bool = True,
        path: str | os.PathLike[str] | None = None,
        **options: Any,
    ) -> None:
        every = check_int(FNAME, "every", every, 1)
        check_bool(FNAME, "optimizer", optimizer)
        if path is not None:
            if not isinstance(path, (str, os.PathLike)):
                raise TypeError(
                    f"{FNAME}: path must be None, a str or an os.PathLike; got {type_name(path)}."
                )
            if os.path.splitext(os.fspath(path))[1].lower() not in (".csv", ".json"):
                raise ValueError(f"{FNAME}: path must end in .csv or .json; got {path!r}.")
        known = list(inspect.signature(CurvatureMonitor).parameters)[3:]
        known = [name for name in known if name not in ("every", "optimizer")]
        for name in options:
            if name not in known:
                raise TypeError(
                    f"{FNAME}: {name!r} is not an option of CurvatureMonitor; expected one of "
                    f"{', '.join(known)}."
                )
        self.loss_fn, self.data, self.every = loss_fn, data, every
        self.use_optimizer, self.path, self.options = optimizer, path, options
        self.monitor: CurvatureMonitor | None = None
        self._restored: dict[str, Any] | None = None
        self._history = CurvatureHistory()

    def __reduce__(self) -> tuple[Any, ...]:
        options = {"every": self.every, "optimizer": self.use_optimizer, "path": self.path}
        return (_make, (self.loss_fn, self.data, {**options, **self.options}), self.__dict__)

    @property
    def history(self) -> CurvatureHistory:
        """The records so far (empty before fitting starts)."""
        return self.monitor.history if self.monitor is not None else self._history

    # ------------------------------------------------------------------------- hooks

    def on_fit_start(self, trainer: Any, pl_module: Any) -> None:
        """Make the monitor on the module and the trainer's optimizer."""
        optimizer = None
        if self.use_optimizer:
            optimizers = list(trainer.optimizers)
            if len(optimizers) != 1:
                raise ValueError(
                    f"{FNAME}: the trainer has {len(optimizers)} optimizers; expected one for "
                    "the stability threshold. Pass optimizer=False."
                )
            optimizer = optimizers[0]
        self.monitor = CurvatureMonitor(
            pl_module,
            self.loss_fn,
            self.data,
            every=self.every,
            optimizer=optimizer,
            **self.options,
        )
        self.monitor.history = self._history
        if self._restored is not None:
            self.monitor.steps = self._restored["steps"]
        else:
            self.monitor.steps = trainer.global_step

    def on_train_batch_end(
        self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """Count the optimizer steps taken since the last batch; check when one is due."""
        if self.monitor is None:
            return
        while self.monitor.steps < trainer.global_step:
            records = self.monitor.step()
            if records:
                self._log(trainer, records)

    def on_fit_end(self, trainer: Any, pl_module: Any) -> None:
        """Write the history to ``path``, on the first process only."""
        if self.path is None or not getattr(trainer, "is_global_zero", True):
            return
        if os.fspath(self.path).lower().endswith(".csv"):
            self.history.to_csv(self.path)
        else:
            self.history.to_json(self.path)

    def state_dict(self) -> dict[str, Any]:
        """The history and the step count, for checkpoints."""
        steps = self.monitor.steps if self.monitor is not None else 0
        records = [vars(r).copy() for r in self.history]
        return {"steps": steps, "records": records}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the history of a checkpoint."""
        self._history = CurvatureHistory(CurvatureRecord(**r) for r in state_dict["records"])
        self._restored = {"steps": int(state_dict["steps"])}
        if self.monitor is not None:
            self.monitor.history = self._history
            self.monitor.steps = self._restored["steps"]

    def _log(self, trainer: Any, records: list[CurvatureRecord]) -> None:
        metrics = {}
        for r in records:
            name = r.quantity + (f"_{r.index}" if r.index else "")
            key = "curvature/" + (f"{r.group}/" if r.group is not None else "") + name
            metrics[key] = r.value
        for logger in getattr(trainer, "loggers", []):
            logger.log_metrics(metrics, step=trainer.global_step)
