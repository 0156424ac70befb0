r"""The exact Hessian diagonal of a model's loss from the structure of its layers.

A ``Linear``, ``Conv1d/2d/3d``, ``Embedding`` or BatchNorm layer (with running statistics)
computes an output :math:`z` linear in its parameters. Index :math:`z` by a *position*
:math:`a` (sample, token, pixel: every axis but the unit axis) and a *unit* :math:`u` (output
feature or channel), and write :math:`z_{au} = \sum_f W_{uf} X^{(u)}_{af} + b_u`, with
:math:`X^{(u)}` the layer's input as unit :math:`u` sees it (the input itself for ``Linear``,
its patches for a convolution, its normalised channel :math:`u` for BatchNorm, one-hot rows
for an embedding, whose weight is indexed the other way round). If the parameters enter
the loss :math:`L` only through :math:`z`, then exactly

.. math::
    \frac{\partial^2 L}{\partial W_{uf}^2} = \sum_{a,b} X^{(u)}_{af} X^{(u)}_{bf} B^{(u)}_{ab},
    \qquad \frac{\partial^2 L}{\partial b_u^2} = \sum_{a,b} B^{(u)}_{ab},
    \qquad B^{(u)}_{ab} = \frac{\partial^2 L}{\partial z_{au}\,\partial z_{bu}} ,

and :math:`B` is read off Hessian-vector products with respect to a zero *probe* tensor
:math:`\varepsilon` added to :math:`z` (the Hessian with respect to :math:`\varepsilon` is the
one with respect to :math:`z`, downstream curvature included). Along an *independent* axis
(samples of a model without batch statistics, tokens of a per-token model) :math:`B` vanishes
between different indices; one product with the cotangent 1 at unit :math:`u` and at a
position :math:`c` of the *coupled* axes, at every index of the independent axes, then gives
the rows of :math:`B^{(u)}` of all independent indices at once. A layer costs
:math:`U \cdot C` products (:math:`U` units, :math:`C` coupled positions) instead of one per
parameter element: :math:`U` for a ``Linear`` layer on independent samples, tokens times
:math:`U` for one over attending tokens, pixels times channels for a convolution.

Nothing is assumed; for this model and batch each layer is checked, and takes the generic
path of one unit-vector product per element whenever a check fails or the rule would cost
more products:

* the layer is called exactly once in the forward pass;
* each of its parameters is used by exactly one operation of the graph (not shared with
  another module or used elsewhere, as tied weights are);
* its recorded output equals the linear map of its recorded input (no hook, subclass or
  padding the rule does not know changed it), to :math:`\sqrt{\epsilon}` relative;
* the samples count as independent only if, for every bit of the sample index, a product
  with a random probe vector on the samples whose bit is 0 leaves exact zeros on those whose
  bit is 1 (:math:`\lceil \log_2 N \rceil` products for all layers together); the tokens
  of a ``Linear`` or ``Embedding`` layer are checked the same way, layer by layer, where that
  can save more products than it takes. A convolution's pixels are taken as coupled (they
  meet in later layers), and so are the samples under BatchNorm with batch statistics
  (train mode); attention couples tokens, and then the coupled rule or the generic path is
  taken.

Layers whose path to the model's output is piecewise linear take, together, the Gauss-Newton
rule of :mod:`._gauss_newton` when it needs fewer products (its checks are described there).
"""

import contextlib
import math
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_secorder.core import _chunks
from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._forward import forward_context
from torch_secorder.core._gauss_newton import backward, piecewise_linear
from torch_secorder.core._progress import counted, warn_if_long

LAYER_TYPES = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.Embedding,
    nn.modules.batchnorm._BatchNorm,
)
"""Layers with a structured rule (BatchNorm when it normalises with its running statistics)."""

CONTRACTION_ELEMENTS = 2**25
"""Most elements of one intermediate of the contraction (chunks of products are split)."""

OUTPUT_BLOCK_BYTES = 2**28
"""Most memory of the per-sample blocks of the output's Hessian (``N D^2`` numbers in float64)
that the Gauss-Newton rule may hold; larger outputs per sample leave the layers' own rules."""


@dataclass(eq=False)
class _Layer:
    """A layer with a rule, and what one forward pass showed of it."""

    module: nn.Module
    indices: list[int]  # of its weight and bias among the selected parameters
    calls: int = 0
    probe: Tensor | None = None  # zeros of the output's shape, added to the output
    input: Tensor | None = None
    version: int = 0
    output: Tensor | None = None
    unit: int = -1  # axis of the units in the output
    axes: list[int] = field(default_factory=list)  # the other axes of the output
    features: Tensor | None = None  # (*axes, G, F) input as units see it; (*axes,) indices

    @property
    def is_embedding(self) -> bool:
        return isinstance(self.module, nn.Embedding)


def structured_diagonal(
    func: Callable[[], Tensor],
    model: nn.Module,
    params: list[Tensor],
    *,
    fname: str,
    names: list[str],
    strict: bool,
    seed: int | None,
    locate: Callable[[str], str | None] | None,
    chunk_size: int | None,
    progress: bool,
) -> tuple[list[Tensor], list[int]]:
    """The exact diagonal of the Hessian of ``func`` (a loss of ``model``) w.r.t. ``params``.

    Layers whose rule is proven exact and cheaper use it; every other parameter takes the
    generic path (unit-vector products of its own block). See the module docstring.

    Returns:
        The diagonal like ``params``, and the products each parameter took: a layer's
        products (checks included) count for its weight, or its bias when the weight is not
        selected; checks of layers that take the generic path count for their parameters'.
    """
    layers = _candidates(model, params)
    root = _Layer(model, [])  # the model's output, for the Gauss-Newton rule
    if layers:
        _trace_calls(func, params, seed, [*layers, root])
        layers = [layer for layer in layers if layer.calls == 1 and layer.probe is not None]
    output = root if layers and root.calls == 1 and root.probe is not None else None
    roots: list[Tensor] = []
    outputs: list[Tensor] = []

    def probed() -> Tensor:
        loss = func()
        roots.append(loss)
        return loss

    probes = [layer.probe for layer in layers] + ([output.probe] if output else [])
    with _probing(layers), _output_probe(output, outputs):
        graph = GradientGraph(
            probed if layers else func,
            params,
            fname=fname,
            names=names,
            strict=strict,
            seed=seed,
            source="loss_fn",
            locate=locate,
            probes=probes,  # type: ignore[arg-type]
        )
    with graph:
        loss = roots[0] if roots and roots[0].grad_fn is not None else None
        uses = _uses(loss, params) if loss is not None else None
        costs = [0] * len(params)
        exact = {
            len(params) + position: layer
            for position, layer in enumerate(layers)
            if uses is not None and _exact(layer, params, uses)
        }
        linear = {i: layer for i, layer in exact.items() if graph.grads[i] is None}
        curved = {i: layer for i, layer in exact.items() if i not in linear}
        factored: dict[int, _Layer] = {}
        if output is not None and outputs and loss is not None:
            out_index = len(params) + len(layers)
            factored, own, spent = _factorable(
                graph, loss, outputs[0], out_index, curved, params, costs
            )
        del loss
        roots.clear()
        rules: dict[int, _Rule | None] = dict.fromkeys(linear)  # zero curvature
        rest = {i: layer for i, layer in curved.items() if i not in factored}
        rules.update(_plans(graph, rest, params, costs, chunk_size, _batch_statistics(model)))
        covered = {i for probe in [*rules, *factored] for i in exact[probe].indices}
        generic = [i for i in range(len(params)) if i not in covered]
        remaining = sum(rule.count for rule in rules.values() if rule is not None)
        remaining += sum(params[i].numel() for i in generic if graph.grads[i] is not None)
        warn_if_long(
            fname,
            graph.num_products + remaining,
            "diagonal",
            "hessian_diagonal_estimate estimates it from far fewer products.",
        )
        diagonal: list[Tensor | None] = [None] * len(params)
        if factored:  # the rule's products shared by its layers, each below its own rules'
            before = graph.num_products
            results, passes = _gauss_newton_diagonals(
                graph, outputs[0], out_index, factored, chunk_size
            )
            spent += graph.num_products - before + passes
            for probe, share in _shares(spent, own).items():
                costs[factored[probe].indices[0]] += share
            for probe, values in results.items():
                for i, value in zip(factored[probe].indices, values):
                    diagonal[i] = value
        outputs.clear()
        with counted(graph, remaining, progress, "diagonal"):
            for probe, rule in rules.items():
                layer = exact[probe]
                if rule is None:
                    values = [torch.zeros_like(params[i]) for i in layer.indices]
                else:
                    before = graph.num_products
                    values = _apply(graph, layer, probe, rule, chunk_size)
                    costs[layer.indices[0]] += graph.num_products - before
                for i, value in zip(layer.indices, values):
                    diagonal[i] = value
            for i in generic:
                before = graph.num_products
                diagonal[i] = graph.own_diagonal(i, chunk_size=chunk_size)
                costs[i] += graph.num_products - before
    return diagonal, costs  # type: ignore[return-value]


# ----------------------------------------------------------------------------- the forward pass


def _candidates(model: nn.Module, params: list[Tensor]) -> list[_Layer]:
    """Layers of known type owning selected parameters that no other module owns."""
    position = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = defaultdict(int)
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] += 1
    layers = []
    for module in model.modules():
        if not isinstance(module, LAYER_TYPES):
            continue
        if isinstance(module, nn.Embedding) and (
            module.max_norm is not None or module.scale_grad_by_freq or module.sparse
        ):
            continue  # renormalised rows, rescaled or sparse gradients: no simple rule
        if _is_norm(module) and (module.training or module.running_mean is None):
            continue  # batch statistics: the output is not the affine map of one input
        own = [getattr(module, name, None) for name in ("weight", "bias")]
        indices = [position[id(p)] for p in own if p is not None and id(p) in position]
        if indices and all(owners[id(params[i])] == 1 for i in indices):
            layers.append(_Layer(module, indices))
    return layers


def _trace_calls(
    func: Callable[[], Tensor], params: list[Tensor], seed: int | None, layers: list[_Layer]
) -> None:
    """Count each layer's calls and make its probe, in one forward pass without a graph."""

    def hook(layer: _Layer) -> Callable[..., None]:
        def record(module: nn.Module, args: object, output: object) -> None:
            layer.calls += 1
            floating = isinstance(output, Tensor) and output.is_floating_point()
            layer.probe = torch.zeros_like(output) if floating else None  # type: ignore[arg-type]

        return record

    handles = [layer.module.register_forward_hook(hook(layer)) for layer in layers]
    try:
        with forward_context(params, seed), torch.no_grad():
            func()
    finally:
        for handle in handles:
            handle.remove()


class _probing:
    """Add each layer's probe to its output and record the input and output, while active."""

    def __init__(self, layers: list[_Layer]) -> None:
        self.layers = layers
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> None:
        for layer in self.layers:
            self.handles.append(
                layer.module.register_forward_hook(self._hook(layer), with_kwargs=True)
            )

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    @staticmethod
    def _hook(layer: _Layer) -> Callable[..., Tensor]:
        def add_probe(module: nn.Module, args: tuple, kwargs: dict, output: Tensor) -> Tensor:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                layer.input, layer.version = x.detach(), x._version
            layer.output = output.detach()
            return output + layer.probe

        return add_probe


@contextlib.contextmanager
def _output_probe(output: _Layer | None, outputs: list[Tensor]) -> Iterator[None]:
    """Add the probe to the model's output and record the sum, while active."""
    if output is None:
        yield
        return

    def add_probe(module: nn.Module, args: object, result: object) -> Tensor | None:
        if not isinstance(result, Tensor) or result.shape != output.probe.shape:  # type: ignore[union-attr]
            return None
        outputs.append(result + output.probe)
        return outputs[-1]

    handle = output.module.register_forward_hook(add_probe)
    try:
        yield
    finally:
        handle.remove()


def _uses(root: Tensor, tensors: list[Tensor]) -> dict[int, int]:
    """How many operations of the graph behind ``root`` use each of ``tensors``.

    An operation whose only input is the tensor (a transpose, a view) passes its own uses on.
    """
    consumers: dict[object, list[object]] = defaultdict(list)
    leaves: dict[int, object] = {}
    stack, seen = [root.grad_fn], set()
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for following, _ in node.next_functions:
            if following is None:
                continue
            consumers[following].append(node)
            variable = getattr(following, "variable", None)
            if variable is not None:
                leaves[id(variable)] = following
            stack.append(following)

    def count(node: object) -> int:
        total = 0
        for consumer in consumers[node]:
            inputs = [n for n, _ in consumer.next_functions if n is not None]  # type: ignore[attr-defined]
            total += count(consumer) if len(inputs) == 1 else 1
        return total

    return {id(t): count(leaves[id(t)]) if id(t) in leaves else 0 for t in tensors}


# ----------------------------------------------------------------------------- checks


def _exact(layer: _Layer, params: list[Tensor], uses: dict[int, int]) -> bool:
    """Whether the rule is exact for this layer: one use of each parameter, linear output."""
    if any(uses[id(params[i])] != 1 for i in layer.indices):
        return False
    x, z = layer.input, layer.output
    if x is None or z is None or x._version != layer.version:
        return False
    module = layer.module
    with torch.no_grad():
        if isinstance(module, nn.Embedding):
            if x.dtype not in (torch.int32, torch.int64) or not torch.equal(module.weight[x], z):
                return False
            layer.unit, layer.features = z.dim() - 1, x
        else:
            if isinstance(module, nn.Linear):
                unit, features = z.dim() - 1, x.unsqueeze(-2)  # (*axes, 1, F)
            elif _is_norm(module):
                if module.weight is None or x.dim() < 2:
                    return False
                unit, features = 1, _norm_features(module, x)
            else:
                unit, features = _conv_features(module, x)  # type: ignore[arg-type]
                if features is None:
                    return False
            layer.unit, layer.features = unit, features
            if not _reproduces(layer, module.weight, module.bias):  # type: ignore[arg-type]
                return False
    layer.axes = [a for a in range(z.dim()) if a != layer.unit]
    return True


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.modules.batchnorm._BatchNorm)


def _norm_features(norm: nn.Module, x: Tensor) -> Tensor:
    """A BatchNorm's normalised input ``(N, *S, C, 1)``: channel ``c`` is group ``c``."""
    shape = [1, -1] + [1] * (x.dim() - 2)
    mean = norm.running_mean.reshape(shape)  # type: ignore[union-attr]
    std = (norm.running_var + norm.eps).sqrt().reshape(shape)  # type: ignore[operator]
    return ((x - mean) / std).movedim(1, -1).unsqueeze(-1)


def _conv_features(conv: nn.Module, x: Tensor) -> tuple[int, Tensor | None]:
    """The unit axis of a convolution's output and its input patches ``(*axes, G, F)``."""
    d = len(conv.kernel_size)  # type: ignore[arg-type]
    batched = x.dim() == d + 2
    if not batched:
        x = x.unsqueeze(0)
    if x.dim() != d + 2:
        return 0, None
    k, stride, dilation = conv.kernel_size, conv.stride, conv.dilation  # type: ignore[attr-defined]
    padding = conv.padding  # type: ignore[attr-defined]
    if isinstance(padding, str):
        totals = [0] * d if padding == "valid" else [dilation[i] * (k[i] - 1) for i in range(d)]
        pads = [(t // 2, t - t // 2) for t in totals]
    else:
        pads = [(p, p) for p in padding]
    flat = [v for pair in reversed(pads) for v in pair]
    if any(flat):
        mode = conv.padding_mode  # type: ignore[attr-defined]
        x = F.pad(x, flat, mode="constant" if mode == "zeros" else mode)
    for i in range(d):
        x = x.unfold(2 + i, dilation[i] * (k[i] - 1) + 1, stride[i])
    x = x[(Ellipsis, *(slice(None, None, dilation[i]) for i in range(d)))]
    n, c = x.shape[:2]
    spatial = x.shape[2 : 2 + d]
    groups = conv.groups  # type: ignore[attr-defined]
    x = x.reshape(n, groups, c // groups, *spatial, *k)
    kernel_axes = list(range(3 + d, 3 + 2 * d))
    x = x.permute(0, 1, 2, *kernel_axes, *range(3, 3 + d))
    x = x.reshape(n, groups, -1, *spatial)  # (N, G, F, *S)
    x = x.permute(0, *range(3, 3 + d), 1, 2)  # (N, *S, G, F)
    return (1, x) if batched else (0, x[0])


def _reproduces(layer: _Layer, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether ``W X + b`` from the recorded features gives the recorded output."""
    z, features = layer.output, layer.features
    groups = features.shape[-2]  # type: ignore[union-attr]
    units = weight.shape[0]
    w = weight.detach().reshape(groups, units // groups, -1)
    rebuilt = torch.einsum("...gf,gvf->...gv", features, w).flatten(-2)  # (*axes, U)
    if bias is not None:
        rebuilt = rebuilt + bias.detach()
    rebuilt = rebuilt.movedim(-1, layer.unit)
    if rebuilt.shape != z.shape:  # type: ignore[union-attr]
        return False
    tolerance = torch.finfo(z.dtype).eps ** 0.5  # type: ignore[union-attr]
    scale = float(z.abs().max()) if z.numel() else 0.0  # type: ignore[union-attr]
    return bool((rebuilt - z).abs().max() <= tolerance * max(scale, 1.0))  # type: ignore[operator]


# ----------------------------------------------------------------------------- products


@dataclass
class _Rule:
    """How a layer's curvature blocks are read: which output axes are independent."""

    independent: list[int]
    coupled: list[int]
    units: int
    count: int  # products


def _plans(
    graph: GradientGraph,
    layers: dict[int, _Layer],
    params: list[Tensor],
    costs: list[int],
    chunk_size: int | None,
    batch_statistics: bool,
) -> dict[int, _Rule]:
    """The rules of the layers (by probe index) that take fewer products than their generic path.

    Taken as coupled without a check: a convolution's pixels (they meet in later layers) and,
    in a model normalising with batch statistics (BatchNorm in train mode), the samples.
    Otherwise the samples (axis 0) of all layers of one length are checked jointly, with one
    product per bit whose cotangent is random on every layer's first half: a layer whose
    second half it leaves at exact zeros is independent along it (the zeros hold for its
    blocks with every layer, its own among them), one that it does not is taken as coupled. A
    ``Linear`` or ``Embedding`` layer's other axes (tokens) are checked one by one where that
    can save more products than it takes.
    """
    rules: dict[int, _Rule] = {}
    coupled = {i: _assumed_coupled(layer, batch_statistics) for i, layer in layers.items()}
    generic = {i: _generic_products(layer, params) for i, layer in layers.items()}
    candidates = {
        i: layer
        for i, layer in layers.items()
        if _cost(layer, coupled[i]) + len(_bits(layer, _token_axes(layer, coupled[i]))) < generic[i]
    }
    joint = [i for i, layer in candidates.items() if layer.axes[:1] == [0] and 0 not in coupled[i]]
    lengths = [candidates[i].probe.shape[0] for i in joint]  # type: ignore[union-attr]
    common = max(set(lengths), key=lengths.count) if lengths else 1
    joint = [i for i in joint if candidates[i].probe.shape[0] == common]  # type: ignore[union-attr]
    spent = 0
    if common > 1:
        before = graph.num_products
        members = [(i, candidates[i].probe, 0) for i in joint]
        bits = range(math.ceil(math.log2(common)))
        for i in _reached(graph, members, bits, chunk_size):  # type: ignore[arg-type]
            coupled[i].add(0)
        spent = graph.num_products - before
    for i, layer in candidates.items():
        if i not in joint and layer.axes[:1] == [0] and layer.probe.shape[0] > 1:  # type: ignore[union-attr]
            coupled[i].add(0)  # a length of its own: not checked
        before = graph.num_products
        for axis in _token_axes(layer, coupled[i]):
            bits = range(math.ceil(math.log2(layer.probe.shape[axis])))  # type: ignore[union-attr]
            saving = _cost(layer, coupled[i] | {axis}) - _cost(layer, coupled[i])
            members = [(i, layer.probe, axis)]
            if saving <= len(bits) or _reached(graph, members, bits, chunk_size):  # type: ignore[arg-type]
                coupled[i].add(axis)
        costs[layer.indices[0]] += graph.num_products - before
        count = _cost(layer, coupled[i])
        if count < generic[i]:
            independent = [a for a in layer.axes if a not in coupled[i]]
            rules[i] = _Rule(independent, sorted(coupled[i]), _units(layer), count)
    if spent:  # the joint check counts for the first layer that gained by it
        gainer = next((i for i in joint if i in rules), joint[0])
        costs[layers[gainer].indices[0]] += spent
    return rules


def _assumed_coupled(layer: _Layer, batch_statistics: bool) -> set[int]:
    """Axes taken as coupled unchecked: pixels, and samples under batch statistics."""
    coupled = set()
    if isinstance(layer.module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        coupled.update(layer.axes[1:] if layer.axes[:1] == [0] else layer.axes)
    if batch_statistics and layer.axes[:1] == [0]:
        coupled.add(0)
    return coupled


def _token_axes(layer: _Layer, coupled: set[int]) -> list[int]:
    """Axes after the first that are not taken as coupled (checked one by one)."""
    return [a for a in layer.axes[1:] if a not in coupled and layer.probe.shape[a] > 1]  # type: ignore[union-attr]


def _cost(layer: _Layer, coupled: set[int]) -> int:
    """Products of the rule when ``coupled`` are the coupled axes."""
    return _units(layer) * math.prod(layer.probe.shape[a] for a in coupled)  # type: ignore[union-attr]


def _batch_statistics(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of the model normalises with the batch's statistics."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )


def _units(layer: _Layer) -> int:
    return layer.probe.shape[layer.unit]  # type: ignore[union-attr]


def _bits(layer: _Layer, axes: list[int]) -> list[tuple[int, int]]:
    """The checks of ``axes``: one per bit of each axis's index."""
    shape = layer.probe.shape  # type: ignore[union-attr]
    return [(a, bit) for a in axes if shape[a] > 1 for bit in range(math.ceil(math.log2(shape[a])))]


def _generic_products(layer: _Layer, params: list[Tensor]) -> int:
    """Products of the generic path for the layer's parameters: one per element."""
    return sum(params[i].numel() for i in layer.indices)


def _halves(tensor: Tensor, axis: int, bits: range) -> Tensor:
    """Per bit, where the ``axis`` index of ``tensor`` has that bit 0 (broadcast elsewhere)."""
    index = torch.arange(tensor.shape[axis], device=tensor.device)
    shape = [1] * tensor.dim()
    shape[axis] = -1
    return torch.stack([((index >> bit) & 1) == 0 for bit in bits]).reshape(len(bits), *shape)


def _random_on(half: Tensor, tensor: Tensor, generator: torch.Generator) -> Tensor:
    """Random values like ``tensor`` for each bit, zero outside its half."""
    random = torch.randn((len(half), *tensor.shape), generator=generator, dtype=tensor.dtype)
    return random.to(tensor.device) * half


def _reaches(half: Tensor, result: Tensor) -> bool:
    """Whether ``result`` is not exactly zero outside ``half``."""
    return bool(torch.where(half, 0, result).ne(0).any())


def _reached(
    graph: GradientGraph,
    members: list[tuple[int, Tensor, int]],
    bits: range,
    chunk_size: int | None,
) -> set[int]:
    """Members ``(probe index, probe, axis)`` whose other half a random first half reaches.

    For each bit, one product whose cotangent is random on every member's positions with
    that bit of the axis index 0; a member is reached when the product is not exactly zero
    where the bit is 1.
    """
    generator = torch.Generator().manual_seed(0)
    halves = [_halves(probe, axis, bits) for _, probe, axis in members]
    randoms = [_random_on(h, probe, generator) for h, (_, probe, _) in zip(halves, members)]
    position = {index: k for k, (index, _, _) in enumerate(members)}

    def cotangents(start: int, stop: int) -> list[Tensor | None]:
        return [
            randoms[position[j]][start:stop] if j in position else None
            for j in range(len(graph.params))
        ]

    probes = [probe for _, probe, _ in members]
    reached = set()
    for start, stop, products in graph.product_chunks(
        len(bits), cotangents, probes, chunk_size=chunk_size
    ):
        for (index, _, _), half, product in zip(members, halves, products):
            if _reaches(half[start:stop], product):
                reached.add(index)
    return reached


def _jacobian_reached(output: Tensor, probes: list[Tensor], bits: range) -> list[bool]:
    """For each probe, whether a random cotangent on some samples of ``output`` reaches others.

    For each bit of the sample index, one backward pass of ``output`` whose cotangent is
    random on the samples with that bit 0; a probe is reached when its gradient is not
    exactly zero on the samples with the bit 1.
    """
    randoms = _random_on(_halves(output, 0, bits), output, torch.Generator().manual_seed(0))
    halves = [_halves(probe, 0, bits) for probe in probes]
    reached = [False] * len(probes)
    for bit in range(len(bits)):  # one pass at a time: each holds gradients like the probes
        grads = backward(output, probes, randoms[bit : bit + 1])
        for i, (half, grad) in enumerate(zip(halves, grads)):
            reached[i] = reached[i] or _reaches(half[bit : bit + 1], grad)
    return reached


def _factorable(
    graph: GradientGraph,
    loss: Tensor,
    output: Tensor,
    out_index: int,
    curved: dict[int, _Layer],
    params: list[Tensor],
    costs: list[int],
) -> tuple[dict[int, _Layer], dict[int, int], int]:
    r"""The layers that take the Gauss-Newton rule (:mod:`._gauss_newton`), checks passed.

    Candidates are the non-embedding layers over the output's samples whose path to the
    output is piecewise linear; they take the rule together when its products (two per
    output element of a sample, and the checks) are fewer than their own rules' at most.
    The checks: the loss's Hessian with respect to the output leaves other samples at exact
    zeros, and so do the Jacobians of the candidates (:math:`\lceil \log_2 N \rceil` products
    and backward passes each).

    Returns:
        The layers by probe index, each one's own products at most (to share the rule's
        products in proportion), and the products the checks took; checks that rule the
        rule out count for the first candidate.
    """
    probe = graph.params[out_index]
    samples = probe.shape[0] if probe.dim() else 0
    candidates = {
        i: layer
        for i, layer in curved.items()
        if not layer.is_embedding and layer.axes[:1] == [0] and layer.probe.shape[0] == samples  # type: ignore[union-attr]
    }
    if not candidates or samples == 0:
        return {}, {}, 0
    linear = piecewise_linear(loss, output, [layer.probe for layer in candidates.values()])  # type: ignore[misc]
    own = {
        i: min(_generic_products(layer, params), _cost(layer, set(layer.axes[1:])))
        for (i, layer), ok in zip(candidates.items(), linear)
        if ok
    }
    bits = range(math.ceil(math.log2(samples)))
    size = probe.numel() // samples
    cost = 2 * (size + len(bits))
    if cost >= sum(own.values()) or samples * size * size * 8 > OUTPUT_BLOCK_BYTES:
        return {}, {}, 0
    before, passes = graph.num_products, 0
    factored: dict[int, _Layer] = {}
    if not _reached(graph, [(out_index, probe, 0)], bits, None):
        probes = [candidates[i].probe for i in own]
        reached = _jacobian_reached(output, probes, bits)  # type: ignore[arg-type]
        factored, passes = {i: candidates[i] for i, hit in zip(own, reached) if not hit}, len(bits)
    spent = graph.num_products - before + passes
    own = {i: own[i] for i in factored}
    if cost >= sum(own.values()):
        costs[candidates[next(iter(candidates))].indices[0]] += spent
        return {}, {}, 0
    return factored, own, spent


def _shares(total: int, weights: dict[int, int]) -> dict[int, int]:
    """``total`` split in proportion to ``weights`` (largest remainders), integers summing to it."""
    whole = sum(weights.values())
    exact = {i: total * w / whole for i, w in weights.items()}
    shares = {i: math.floor(x) for i, x in exact.items()}
    left = total - sum(shares.values())
    for i in sorted(exact, key=lambda i: shares[i] - exact[i])[:left]:
        shares[i] += 1
    return shares


def _gauss_newton_diagonals(
    graph: GradientGraph,
    output: Tensor,
    out_index: int,
    layers: dict[int, _Layer],
    chunk_size: int | None,
) -> tuple[dict[int, list[Tensor]], int]:
    """The diagonals of the layers' parameters by the Gauss-Newton rule, and its backward passes.

    :math:`D` products give each sample's block :math:`H_n` of the loss's Hessian with respect
    to the output; for each of its eigenvectors one backward pass gives every layer's
    per-sample pseudo-gradients, whose squares, weighted by the eigenvalues, add up to the
    diagonal (see :mod:`._gauss_newton`); the passes' results are held and contracted in
    chunks as products are.
    """
    probe = graph.params[out_index]
    samples, size = probe.shape[0], probe[0].numel()

    def cotangents(start: int, stop: int) -> list[Tensor | None]:
        k = torch.arange(stop - start, device=probe.device)
        units = probe.new_zeros(stop - start, samples, size)
        units[k, :, start + k] = 1
        return _only(graph, out_index, units.reshape(stop - start, *probe.shape))

    chunks = graph.product_chunks(size, cotangents, [probe], chunk_size=chunk_size)
    rows = torch.cat([products for _, _, (products,) in chunks]).reshape(size, samples, size)
    blocks = rows.permute(1, 2, 0).to(torch.float64 if probe.device.type != "mps" else probe.dtype)
    values, vectors = torch.linalg.eigh((blocks + blocks.transpose(1, 2)) / 2)
    values, vectors = values.to(probe.dtype).T, vectors.to(probe.dtype).permute(2, 0, 1)
    sums = {i: _factored_zeros(layer) for i, layer in layers.items()}
    probes = [layer.probe for layer in layers.values()]
    step = chunk_size or _chunks.chunk_size(graph, size, probes)  # type: ignore[arg-type]
    for start in range(0, size, step):
        part = slice(start, start + step)
        deltas = backward(output, probes, vectors[part].reshape(-1, *probe.shape))  # type: ignore[arg-type]
        with torch.no_grad():
            for (i, layer), delta in zip(layers.items(), deltas):
                _add_pseudo_gradients(layer, delta, values[part], *sums[i])
    results = {i: _selected(layer, graph.params, *sums[i]) for i, layer in layers.items()}
    return results, size


def _factored_zeros(layer: _Layer) -> tuple[Tensor, Tensor]:
    """Zero sums ``(U, F)`` and ``(U,)`` for a layer's weight and bias diagonals."""
    units = layer.probe.shape[layer.unit]  # type: ignore[union-attr]
    features = layer.features.shape[-1]  # type: ignore[union-attr]
    return layer.probe.new_zeros(units, features), layer.probe.new_zeros(units)  # type: ignore[union-attr]


def _add_pseudo_gradients(
    layer: _Layer, delta: Tensor, weights: Tensor, weight: Tensor, bias: Tensor
) -> None:
    r"""Add :math:`\sum_{c,n} w_{cn} g_{cn}^2`, per-sample gradients squared and weighted.

    :math:`g_{cn}` is the gradient of pseudo-output :math:`c` of sample :math:`n` with respect
    to the layer's parameters, from ``delta`` ``(k, *z.shape)``, its gradient with respect to
    the layer's output; ``weights`` is ``(k, N)``.
    """
    count, samples, units = delta.shape[0], delta.shape[1], delta.shape[1 + layer.unit]
    features = layer.features.reshape(samples, -1, *layer.features.shape[-2:])  # type: ignore[union-attr]
    groups = features.shape[2]
    per_sample = delta.movedim(1 + layer.unit, -1).reshape(
        count, samples, -1, groups, units // groups
    )
    step = max(1, CONTRACTION_ELEMENTS // max(1, count * units * features.shape[-1]))
    for start in range(0, samples, step):
        part = slice(start, start + step)
        g = torch.einsum("knagv,nagf->kngvf", per_sample[:, part], features[part])
        weight.add_(torch.einsum("kn,knuf->uf", weights[:, part], g.flatten(2, 3).square()))
        sums = per_sample[:, part].sum(dim=2).flatten(2)  # (k, n, U)
        bias.add_(torch.einsum("kn,knu->u", weights[:, part], sums.square()))


def _only(graph: GradientGraph, index: int, cotangent: Tensor) -> list[Tensor | None]:
    """Cotangents like the graph's params: ``cotangent`` at ``index``, ``None`` elsewhere."""
    return [cotangent if j == index else None for j in range(len(graph.params))]


def _apply(
    graph: GradientGraph, layer: _Layer, probe_index: int, rule: _Rule, chunk_size: int | None
) -> list[Tensor]:
    """Run the layer's products and contract them into the diagonal of its parameters."""
    probe, module = layer.probe, layer.module
    order = [*rule.independent, *rule.coupled]
    sizes = [probe.shape[a] for a in order]  # type: ignore[union-attr]
    inner = math.prod(sizes[: len(rule.independent)])
    outer = math.prod(sizes[len(rule.independent) :])
    permutation = [*order, layer.unit]
    inverse = [0] + [1 + permutation.index(a) for a in range(probe.dim())]  # type: ignore[union-attr]
    if layer.is_embedding:
        tokens = layer.features.permute(order).reshape(inner, outer)  # type: ignore[union-attr]
        values = torch.zeros_like(module.weight)  # (V, U)
    else:
        axes = [layer.axes.index(a) for a in order]
        features = layer.features.permute(*axes, -2, -1)  # type: ignore[union-attr]
        features = features.reshape(inner, outer, *features.shape[-2:])  # (I, C, G, F)
        groups = features.shape[2]
        per_group = rule.units // groups
        weight = probe.new_zeros(rule.units, features.shape[3])  # type: ignore[union-attr]
        bias = probe.new_zeros(rule.units)  # type: ignore[union-attr]

    def cotangents(start: int, stop: int) -> list[Tensor | None]:
        k = torch.arange(stop - start, device=probe.device)  # type: ignore[union-attr]
        products = torch.arange(start, stop, device=probe.device)  # type: ignore[union-attr]
        units = probe.new_zeros(stop - start, inner, outer, rule.units)  # type: ignore[union-attr]
        units[k, :, products // rule.units, products % rule.units] = 1
        stacked = units.reshape(stop - start, *(probe.shape[a] for a in permutation))  # type: ignore[union-attr]
        return _only(graph, probe_index, stacked.permute(inverse))

    chunks = graph.product_chunks(rule.count, cotangents, [probe], chunk_size=chunk_size)  # type: ignore[list-item]
    with torch.no_grad():
        for start, stop, (products,) in chunks:
            rows = products.permute(0, *(1 + a for a in permutation))
            rows = rows.reshape(stop - start, inner, outer, rule.units)
            index = torch.arange(start, stop, device=rows.device)
            positions, units = index // rule.units, index % rule.units
            selected = rows[torch.arange(stop - start, device=rows.device), :, :, units]
            if layer.is_embedding:
                _embedding_rows(values, tokens, selected, positions, units)
            else:
                for part in _parts(stop - start, inner * outer * features.shape[3]):
                    g = units[part] // per_group
                    _linear_rows(
                        weight, bias, features, selected[part], positions[part], units[part], g
                    )
    if layer.is_embedding:
        if module.padding_idx is not None:  # type: ignore[union-attr]
            values[module.padding_idx] = 0  # its gradient is masked: no curvature
        return [values]
    return _selected(layer, graph.params, weight, bias)


def _selected(layer: _Layer, params: list[Tensor], weight: Tensor, bias: Tensor) -> list[Tensor]:
    """The diagonals of the layer's selected parameters, ``(U, F)`` and ``(U,)`` sums reshaped."""
    module = layer.module
    own = ((getattr(module, "weight", None), weight), (getattr(module, "bias", None), bias))
    return [
        values.reshape(p.shape)
        for p, values in own
        if p is not None and any(p is params[i] for i in layer.indices)
    ]


def _parts(count: int, per_product: int) -> list[slice]:
    """Split ``count`` products so that one part's intermediates stay bounded."""
    size = max(1, CONTRACTION_ELEMENTS // max(1, per_product))
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def _linear_rows(
    weight: Tensor,
    bias: Tensor,
    features: Tensor,
    rows: Tensor,
    positions: Tensor,
    units: Tensor,
    groups: Tensor,
) -> None:
    r"""Add products' contributions to the weight's and bias's diagonals.

    ``rows`` is ``(k, I, C)``: row ``positions[k]`` of the block of ``units[k]``, for every
    independent index; each adds :math:`X_{cf} \sum_{c'} B_{cc'} X_{c'f}` summed over the
    independent indices.
    """
    if features.shape[2] == 1:  # one group: every unit sees the same input
        x = features[:, :, 0, :]  # (I, C, F)
        if x.shape[1] == 1:  # no coupled positions: a matrix product
            contributions = rows[:, :, 0] @ x[:, 0, :].square()
        else:
            paired = torch.bmm(rows.transpose(0, 1), x)  # (I, k, F)
            contributions = (x[:, positions, :] * paired).sum(dim=0)
    else:
        seen = features.index_select(2, groups)  # (I, C, k, F)
        k = torch.arange(len(units), device=rows.device)
        paired = torch.einsum("kic,ickf->kif", rows, seen)
        own = seen[:, positions, k, :]  # (I, k, F)
        contributions = torch.einsum("ikf,kif->kf", own, paired)
    weight.index_add_(0, units, contributions)
    bias.index_add_(0, units, rows.sum(dim=(1, 2)))


def _embedding_rows(
    values: Tensor, tokens: Tensor, rows: Tensor, positions: Tensor, units: Tensor
) -> None:
    """Add products' contributions to an embedding's diagonal: pairs of equal tokens."""
    own = tokens[:, positions]  # (I, k): the row each product's position looks up
    same = tokens.unsqueeze(1) == own.unsqueeze(-1)  # (I, k, C)
    sums = torch.einsum("kic,ikc->ki", rows, same.to(rows.dtype))
    k, inner = sums.shape
    values.index_put_(
        (own.T.reshape(-1), units.repeat_interleave(inner)), sums.reshape(-1), accumulate=True
    )
