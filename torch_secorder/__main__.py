"""Command line: ``torch-secorder report`` (also ``python -m torch_secorder report``).

Writes a Hessian report of a model (top eigenvalues, trace, spectral density plot, per-layer
table, and with ``--activations`` a table of the Hessians with respect to module outputs) as
Markdown, JSON and PNG. With no arguments it trains a small network on data the
package generates, so it runs on a fresh machine without downloads.
"""

import argparse
import contextlib
import importlib
import importlib.util
import pickle
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn

from torch_secorder import __version__
from torch_secorder._checks import reshuffling_sampler
from torch_secorder._data import is_batch, to_device

LOSSES: dict[str, Callable[..., Any]] = {
    "cross-entropy": nn.CrossEntropyLoss,
    "mse": nn.MSELoss,
}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


class UsageError(Exception):
    """A problem with the command line or what it points to, reported in one line."""


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors take one line (no usage block before them)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``torch-secorder``."""
    main_parser = _Parser(
        prog="torch-secorder", description="Second-order analysis of PyTorch models."
    )
    main_parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = main_parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser(
        "report",
        help="write a Hessian report of a model",
        description=(
            "Write a Hessian report (top eigenvalues with residuals, trace, exact or with its "
            "standard error, spectral density plot, per-layer table) as report.md, report.json and "
            "density.png. Without --model and --data: a small MLP trained on generated spirals."
        ),
    )
    report.add_argument("--out", type=Path, default=Path("hessian-report"), help="output folder")
    report.add_argument("--model", metavar="MODULE:FACTORY", help="callable returning the model")
    report.add_argument("--checkpoint", type=Path, help="state_dict file to load into the model")
    report.add_argument(
        "--data",
        metavar="MODULE:FACTORY",
        help="callable returning a Dataset, a DataLoader/list of (inputs, targets) batches, "
        "or one batch",
    )
    report.add_argument(
        "--loss",
        default="cross-entropy",
        help="cross-entropy, mse, or MODULE:FN with fn(outputs, targets) -> mean loss",
    )
    report.add_argument("--params", nargs="+", metavar="GLOB", help="parameters to analyse")
    report.add_argument("--device", default="cpu", help="device, e.g. cpu or cuda:0")
    report.add_argument("--dtype", choices=sorted(DTYPES), help="cast the model and data")
    report.add_argument("--k", type=int, default=5, help="number of top eigenvalues")
    report.add_argument(
        "--probes",
        type=int,
        help="spectral density probes (default: 4 on small models, 1 from 65,536 parameters)",
    )
    report.add_argument("--steps", type=int, default=100, help="Lanczos steps per probe")
    report.add_argument(
        "--trace-matvecs",
        type=int,
        default=100,
        help="budget of the trace: exact when the exact diagonal takes at most this many "
        "products, else Hutch++ with this many",
    )
    report.add_argument(
        "--per-layer",
        choices=("auto", "all", "trace", "none"),
        default="auto",
        help="per-layer table: each module's trace and top eigenvalue (all), its trace only, "
        "none, or auto (default): the traces when they cost at most twice the products of "
        "the whole-model stages (exact traces from the whole diagonal cost none), with the "
        "top eigenvalues when both together fit",
    )
    report.add_argument(
        "--layer-matvecs",
        type=int,
        help="budget of each module's trace, exact or Hutch++ (default: --trace-matvecs)",
    )
    report.add_argument(
        "--activations",
        nargs="*",
        metavar="MODULE",
        help="add a table of the loss Hessian with respect to module outputs (HAWQ-style "
        "layer sensitivity): each module's trace, exact or Hutch++ with --layer-matvecs, and "
        "top eigenvalue; the modules by name or glob pattern, or without names those of the "
        "per-layer table (the modules owning the analysed parameters)",
    )
    report.add_argument("--batch-size", type=int, default=256, help="batch size for a Dataset")
    report.add_argument("--seed", type=int, default=0, help="seed of the random probes")
    report.add_argument("--threads", type=int, help="torch CPU threads")
    report.add_argument("--no-progress", action="store_true", help="hide progress bars")
    report.add_argument("--traceback", action="store_true", help="show tracebacks of errors")
    return main_parser


@contextlib.contextmanager
def importable(directory: Path) -> Iterator[None]:
    """``directory`` first on the import path for the duration (as ``python -m`` has it)."""
    entry = str(directory)
    if entry in sys.path:
        yield
        return
    sys.path.insert(0, entry)
    try:
        yield
    finally:
        if entry in sys.path:
            sys.path.remove(entry)


def load_object(spec: str, option: str) -> Any:
    """Import ``module:attribute``: a dotted module (also from the working directory) or a file.

    A ``.py`` file is run with its own folder on the import path, a dotted module is imported
    with the working directory on it (where the console script does not put it), so that
    ``--model mymodule:make_model`` finds ``mymodule.py`` where the command runs; the path is
    restored afterwards.
    """
    module_name, sep, attribute = spec.partition(":")
    if not sep or not module_name or not attribute:
        raise UsageError(f"{option} must look like module:attribute; got {spec!r}")
    try:
        if module_name.endswith(".py"):
            path = Path(module_name)
            if not path.is_file():
                raise UsageError(f"{option}: no such file {module_name}")
            spec_ = importlib.util.spec_from_file_location(path.stem, path)
            module = importlib.util.module_from_spec(spec_)  # type: ignore[arg-type]
            with importable(path.resolve().parent):
                spec_.loader.exec_module(module)  # type: ignore[union-attr]
        else:
            with importable(Path.cwd()):
                module = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"{option}: cannot import {module_name!r} ({err})") from None
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise UsageError(f"{option}: module {module_name!r} has no {attribute!r}") from None


def call_factory(spec: str, option: str) -> Any:
    """Import a factory and call it without arguments (the working directory importable)."""
    factory = load_object(spec, option)
    if not callable(factory):
        raise UsageError(f"{option}: {spec} is not callable")
    with importable(Path.cwd()):
        return factory()


def resolve_loss(name: str) -> Callable[..., Any]:
    """A loss by name or import path."""
    if name in LOSSES:
        return LOSSES[name]()
    if ":" not in name:
        raise UsageError(f"--loss must be one of {', '.join(LOSSES)} or module:fn; got {name!r}")
    loss = load_object(name, "--loss")
    if not callable(loss):
        raise UsageError(f"--loss: {name} is not callable")
    return loss


def load_checkpoint(model: nn.Module, path: Path) -> None:
    """Load a state dict (possibly under a "state_dict" or "model_state_dict" key)."""
    if not path.is_file():
        raise UsageError(f"--checkpoint: no such file {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if isinstance(err, pickle.UnpicklingError) and "Unsupported global" in str(err):
            raise UsageError(
                f"--checkpoint: {path} holds more than tensors (a whole model saved with "
                "torch.save(model)?); save its state dict instead: "
                "torch.save(model.state_dict(), path)"
            ) from None
        raise UsageError(f"--checkpoint: cannot read {path}: not a file torch.save wrote") from None
    if isinstance(state, dict):
        for key in ("state_dict", "model_state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
    if not isinstance(state, dict):
        raise UsageError(f"--checkpoint: {path} holds a {type(state).__name__}, not a state dict")
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[1:3]) or first[0]
        raise UsageError(f"--checkpoint: {path} does not match the model: {detail}") from None


def as_batches(data: Any, batch_size: int) -> Any:
    """A Dataset becomes a DataLoader; batches are checked to hold tensors."""
    if isinstance(data, torch.utils.data.Dataset) and not isinstance(
        data, torch.utils.data.IterableDataset
    ):
        data = torch.utils.data.DataLoader(data, batch_size=batch_size)
    sampler = reshuffling_sampler(data)  # (the library's check, hidden by the casting view)
    if sampler is not None:
        raise UsageError(
            f"--data: a DataLoader whose {type(sampler).__name__} draws another order on every "
            "pass; every product passes over the data again, and all passes must see the same "
            "batches in the same order: use shuffle=False (or a fixed sampler)"
        )
    first = data if is_batch(data) else next(iter(data), None)
    if first is None:
        raise UsageError("--data: the data set is empty")
    if not is_batch(first) or not _holds_tensor(first[0]):
        raise UsageError(
            "--data: batches must be (inputs, targets) pairs of tensors; got "
            f"{type(first).__name__}"
        )
    return data


def _holds_tensor(inputs: Any) -> bool:
    if isinstance(inputs, torch.Tensor):
        return True
    values = inputs.values() if isinstance(inputs, dict) else inputs
    return isinstance(values, (tuple, list, type({}.values()))) and any(
        isinstance(v, torch.Tensor) for v in values
    )


class _CastBatches:
    """Re-iterable view of batches moved and cast on the fly."""

    def __init__(self, batches: Any, device: torch.device, dtype: torch.dtype | None) -> None:
        self.batches, self.device, self.dtype = batches, device, dtype

    def __iter__(self) -> Any:
        return (to_device(batch, self.device, self.dtype) for batch in self.batches)


def _progress(enabled: bool, total: int) -> Any:
    if not enabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, unit="stage", leave=False)


def check_device(spec: str) -> torch.device:
    """Parse ``--device`` and check that this machine has it."""
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"--device: unknown device {spec!r}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(
                f"--device: {spec} is not available: this torch ({torch.__version__}) sees no "
                "CUDA device; use --device cpu"
            )
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device: {spec} is not available: {count} CUDA device(s)")
    elif device.type == "mps":
        if not torch.backends.mps.is_available():
            raise UsageError(f"--device: {spec} is not available on this machine")
    elif device.type == "meta":
        raise UsageError("--device: meta tensors hold no values; use cpu or an accelerator")
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except Exception as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--device: {spec} is not available ({first})") from None
    return device


def check_out(out: Path) -> None:
    """The output folder exists (it is created) and is writable."""
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out: {out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise UsageError(f"--out: cannot create {out} ({err.strerror})") from None
    try:  # (a file written and removed: os.access says yes to root everywhere)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as err:
        raise UsageError(f"--out: {out} is not writable ({err.strerror})") from None


def check_numbers(args: argparse.Namespace) -> None:
    """Counts must be positive; Hutch++ budgets at least 3."""
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be positive; got {args.threads}")
    for option in ("k", "probes", "steps", "batch_size"):
        if getattr(args, option) is not None and getattr(args, option) < 1:
            raise UsageError(
                f"--{option.replace('_', '-')} must be positive; got {getattr(args, option)}"
            )
    for option in ("trace_matvecs", "layer_matvecs"):
        value = getattr(args, option)
        if value is not None and value < 3:
            raise UsageError(
                f"--{option.replace('_', '-')} must be at least 3 (Hutch++ needs a sketch, its "
                f"projection and a probe); got {value}"
            )


def plan_for(model: nn.Module, args: argparse.Namespace) -> Any:
    """The report's plan; a selection that matches nothing is an error of its option."""
    from torch_secorder._report import make_plan
    from torch_secorder.core._variables import select_modules

    if args.activations:
        try:
            select_modules("select_modules", model, args.activations)
        except ValueError as err:
            message = str(err).replace("select_modules: modules ", "", 1)
            raise UsageError(f"--activations: {message}") from None
    try:
        return make_plan(
            model,
            args.params,
            k=args.k,
            trace_matvecs=args.trace_matvecs,
            layer_matvecs=args.layer_matvecs,
            probes=args.probes,
            steps=args.steps,
            per_layer=args.per_layer,
            activations=args.activations,
        )
    except (TypeError, ValueError) as err:
        message = str(err).replace("select_params: params ", "", 1)
        raise UsageError(f"--params: {message}") from None


def demo_setup(dtype: torch.dtype, device: torch.device) -> tuple[nn.Module, Any, Any, dict]:
    """The package's small network (untrained) on generated spirals."""
    from torch_secorder._demo import demo_model, spirals

    inputs, targets = spirals(dtype=dtype)
    model = demo_model(dtype=dtype)
    setup = {
        "model": "tanh MLP 2-32-32-3 (torch_secorder demo), trained with Adam",
        "data": f"{len(inputs)} generated spiral points in {-(-len(inputs) // 256)} batches",
        "loss": "cross-entropy",
    }
    return model, inputs, targets, setup


def demo_train(model: nn.Module, inputs: Any, targets: Any, progress: bool) -> float:
    """Train the demo network; return its training accuracy."""
    from torch_secorder._demo import train

    bar = _progress(progress, 1)
    if bar is not None:
        bar.set_description("training")
    try:
        return train(model, inputs, targets)
    finally:
        if bar is not None:
            bar.close()


def activations_for(plan: Any, model: nn.Module, loss_fn: Any, data: Any) -> Any:
    """The operator of ``--activations`` (``None`` without it), built before any product.

    Building it runs the model once over the data; a module that is not called once or does
    not return one floating-point tensor is an error of the option.
    """
    from torch_secorder._report import activation_table_operator

    if plan.activations is None:
        return None
    try:
        return activation_table_operator(plan, model, loss_fn, data)
    except (TypeError, ValueError) as err:
        message = str(err).strip().splitlines()[0].removeprefix("HessianOperator.from_model: ")
        if message.startswith("modules selects "):  # "--activations selects 'relu', which ..."
            raise UsageError(f"--activations {message.removeprefix('modules ')}") from None
        raise UsageError(f"--activations: {message}") from None


def run_report(args: argparse.Namespace, log: Any = print) -> list[Path]:
    """Check every argument, then build and write the report for parsed arguments."""
    from torch_secorder._report import hessian_report

    # Everything that can be wrong with the arguments is checked before any work.
    check_numbers(args)
    device = check_device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    progress = not args.no_progress
    if (args.model is None) != (args.data is None):
        raise UsageError("--model and --data go together (without both: the built-in demo)")
    loss_fn = resolve_loss(args.loss)
    if args.checkpoint is not None and not args.checkpoint.is_file():
        raise UsageError(f"--checkpoint: no such file {args.checkpoint}")
    check_out(args.out)
    if args.model is None:
        model, inputs, targets, setup = demo_setup(dtype or torch.float64, device)
    else:
        model = call_factory(args.model, "--model")
        if not isinstance(model, nn.Module):
            raise UsageError(
                f"--model: {args.model} returned a {type(model).__name__}, not a Module"
            )
        setup = {"model": args.model, "data": args.data, "loss": args.loss}
    if args.checkpoint is not None:
        load_checkpoint(model, args.checkpoint)
        setup["checkpoint"] = str(args.checkpoint)
    plan = plan_for(model, args)
    if args.model is not None:
        model = model.to(device=device, dtype=dtype) if dtype else model.to(device)
        data = as_batches(call_factory(args.data, "--data"), args.batch_size)
        if is_batch(data):
            data = to_device(data, device, dtype)
        else:
            data = _CastBatches(data, device, dtype)
    # The work: training the demo (unless a checkpoint gave its weights), then the stages.
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.model is None:
        if args.checkpoint is None:
            accuracy = demo_train(model, inputs, targets, progress)
            setup["training accuracy"] = f"{accuracy:.3f}"
        else:
            setup["model"] = "tanh MLP 2-32-32-3 (torch_secorder demo), weights from checkpoint"
        model.to(device)
        data = list(zip(inputs.to(device).split(256), targets.to(device).split(256)))
    activations = activations_for(plan, model, loss_fn, data)
    first = next(iter(model.parameters()), None)
    setup["dtype"] = str(first.dtype).removeprefix("torch.") if first is not None else "-"
    setup["device"] = str(device)
    setup["mode"] = "train" if model.training else "eval"
    setup["torch_secorder"] = __version__
    setup["torch"] = torch.__version__
    return hessian_report(
        model,
        loss_fn,
        data,
        args.out,
        plan,
        params=args.params,
        seed=args.seed,
        setup=setup,
        progress=progress,
        log=log,
        activations=activations,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; errors are one line on stderr and a non-zero exit status."""
    from torch_secorder._report import StageFailed, StageInterrupted

    args = parser().parse_args(argv)
    start = time.perf_counter()
    try:
        paths = run_report(args)
    except StageInterrupted as stop:
        print(
            f"torch-secorder report: interrupted during stage {stop.stage!r}; the finished "
            f"stages are in {stop.paths[0]}",
            file=sys.stderr,
        )
        return 130
    except KeyboardInterrupt:
        print("torch-secorder report: interrupted", file=sys.stderr)
        return 130
    except StageFailed as failure:
        if args.traceback:
            raise failure.error from None
        print(
            f"torch-secorder report: error: {failure}; the finished stages are in "
            f"{failure.paths[0]}",
            file=sys.stderr,
        )
        return 2
    except Exception as err:
        if args.traceback:
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else ""
        if not isinstance(err, UsageError):  # (raised by the model, the loss or the library)
            message = f"{type(err).__name__}: {message} (--traceback shows where)"
        print(f"torch-secorder report: error: {message}", file=sys.stderr)
        return 2
    elapsed = time.perf_counter() - start
    print(f"wrote {', '.join(str(p) for p in paths)} in {elapsed:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
