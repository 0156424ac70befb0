"""The orchestration: candidates, probes, admission, the plan, then the products.

:class:`StructuredDiagonal` runs one forward pass with a zero probe added to the output of
every layer that has a rule (and to the model's output), builds the gradient graph once,
admits each layer by the structural checks of the package docstring, decides each layer's
path (:mod:`.plan`, :mod:`.gauss_newton`) and reports that plan; :meth:`~StructuredDiagonal.run`
then computes the diagonal. Every parameter not covered by an admitted layer takes the
generic path: one unit-vector product per element of its own block.
"""

import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._progress import counted
from torch_secorder.core._structured import contraction, gauss_newton, plan
from torch_secorder.core._structured.graph import ProbedOutput, consumers, private
from torch_secorder.core._structured.independence import count, hessian_reached
from torch_secorder.core._structured.rules import LayerRule, Layout, rule_for


@dataclass(eq=False)
class _Layer:
    """A module with a rule that owns selected parameters, and what the forward pass showed."""

    module: nn.Module
    name: str
    rule: LayerRule
    roles: dict[str, int]  # role -> index of the selected parameter
    refusal: str | None = None  # why its parameters take the generic path
    calls: int = 0
    layout: Layout | None = None
    position: int = -1  # of its probe among the graph's params
    summed: object = None  # the node adding the probe to its output
    method: str = "generic"
    detail: str = ""


@dataclass(frozen=True)
class PlanEntry:
    """One module's path: its selected parameters (by index), method, products and reason."""

    module: str
    indices: tuple[int, ...]
    method: str
    products: int
    reason: str


_ALTERED = (
    "its output is held elsewhere (a hook, a cache) and modified in place later: a probe "
    "would change what the holder reads"
)


class _Probes:
    """Forward hooks adding a zero probe to each layer's output (and the model's), once each.

    Adding a probe makes a new tensor, ``output + probe``, for the rest of the forward pass.
    The function stays the same unless that tensor is modified in place (an in-place
    activation) while the output itself is held elsewhere (a hook or a cache that the loss
    reads): the holder would no longer see the modification; or unless the output itself is
    modified in place through such a holder: the rest of the pass would no longer see it.
    :meth:`altered` finds those probes after the pass and the loss
    (:class:`~torch_secorder.core._structured.graph.ProbedOutput`).
    """

    def __init__(
        self, model: nn.Module, layers: list[_Layer], offset: int, *, output: bool
    ) -> None:
        self.model, self.layers, self.offset = model, layers, offset
        self.probe_output = output and bool(layers)
        self.tensors: list[Tensor] = []
        self.output: Tensor | None = None  # the model's output, probe added
        self.output_node: object = None
        self.output_position = -1
        self.output_calls = 0
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.watched: list[tuple[ProbedOutput, _Layer | None]] = []

    def __enter__(self) -> "_Probes":
        for layer in self.layers:
            self.handles.append(layer.module.register_forward_hook(self._layer_hook(layer)))
        if self.probe_output:
            self.handles.append(self.model.register_forward_hook(self._output_hook))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()

    def altered(self) -> list[_Layer | None]:
        """The layers (``None``: the model's output) whose probe changed the function."""
        found = [owner for probed, owner in self.watched if probed.altered()]
        self.watched.clear()
        return found

    def _add(self, output: object, owner: _Layer | None) -> tuple[Tensor, int] | None:
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return None
        if not output.requires_grad:
            return None
        probe = torch.zeros_like(output, requires_grad=True)
        self.tensors.append(probe)
        summed = output + probe
        self.watched.append((ProbedOutput(output, summed), owner))
        return summed, self.offset + len(self.tensors) - 1

    def _layer_hook(self, layer: _Layer) -> Callable[..., Tensor | None]:
        def add_probe(module: nn.Module, args: object, output: object) -> Tensor | None:
            layer.calls += 1
            if layer.calls > 1 or not isinstance(output, Tensor) or output.grad_fn is None:
                return None
            matched = layer.rule.match(module, output)
            if isinstance(matched, str):
                layer.refusal = matched
                return None
            added = self._add(output, layer)
            if added is None:
                return None
            layer.layout, (summed, layer.position) = matched, added
            layer.summed = summed.grad_fn
            return summed

        return add_probe

    def _output_hook(self, module: nn.Module, args: object, output: object) -> Tensor | None:
        self.output_calls += 1
        added = self._add(output, None) if self.output_calls == 1 else None
        if added is None:
            return None
        self.output, self.output_position = added
        self.output_node = self.output.grad_fn
        return self.output


_HOOKED = "the forward pass registers a gradient hook (Tensor.register_hook)"


class _HookWatch(TorchFunctionMode):
    """Notes whether the forward pass registers a hook on a tensor's gradient.

    Such a hook changes the gradient the generic path differentiates, and would also run on
    the rules' own backward passes (with other cotangents): no rule holds.
    """

    hooked = False

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if func is Tensor.register_hook:
            self.hooked = True
        return func(*args, **(kwargs or {}))


class StructuredDiagonal:
    """The exact diagonal of a model's loss by layer rules where proven, planned up front.

    Args:
        func: The loss closure of ``model`` on one batch.
        model: The model.
        params: The selected parameters.
        fname: Public function name, for messages.
        names: The parameters' names.
        strict: Raise if the loss does not depend on a parameter.
        seed: RNG seed of the forward pass.
        locate: Names the module calling an operator, for messages.
        chunk_size: Products per batched call.
        budget: Products the caller would spend at most: when even a plan passing every check
            for free would take more, no check is run and every layer is planned generic
            (:attr:`over_budget`).

    Attributes:
        graph: The gradient graph, with the probes after the parameters.
        entries: The plan, one :class:`PlanEntry` per module owning selected parameters.
        costs: Products per parameter: a layer's products (its checks included) are shared
            among its parameters in proportion to their sizes.
        over_budget: Whether the plan was cut short by ``budget``.
    """

    def __init__(
        self,
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
        budget: float = math.inf,
    ) -> None:
        self.fname, self.params, self.names, self.chunk_size = fname, params, names, chunk_size
        self.budget = budget
        self.owners = _owner_types(model, params)
        excluded: set[str | None] = set()  # layers (None: the output) whose probe alters the loss
        watch = _HookWatch()
        while True:
            self.layers = _candidates(model, params)
            for layer in self.layers:
                if layer.name in excluded and layer.refusal is None:
                    layer.refusal = _ALTERED
            active = [layer for layer in self.layers if layer.refusal is None]
            probes = _Probes(model, active, len(params), output=None not in excluded)
            roots: list[Tensor] = []

            def probed() -> Tensor:
                with watch:
                    loss = func()
                roots.append(loss)  # noqa: B023 - called before the next iteration
                return loss

            with probes:
                self.graph = GradientGraph(
                    probed,
                    params,
                    fname=fname,
                    names=names,
                    strict=strict,
                    seed=seed,
                    source="loss_fn",
                    locate=locate,
                    probes=probes.tensors,
                )
            altered = probes.altered()
            if not altered:
                break
            self.graph.release()
            excluded |= {None if layer is None else layer.name for layer in altered}
        # products through the graph would run the hooks on other vectors
        hooked = _HOOKED if watch.hooked else _backward_hooked(model)
        if hooked:
            for layer in self.layers:
                layer.refusal = layer.refusal or hooked
        try:
            loss = roots[0] if roots and roots[0].grad_fn is not None else None
            roots.clear()
            self._decide(loss, probes, _batch_statistics(model))
        except BaseException:
            self.graph.release()
            raise

    def __enter__(self) -> "StructuredDiagonal":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Drop the gradient graph and the layers' recorded inputs."""
        self.graph.release()
        self.output = None
        for layer in self.layers:
            layer.layout = None

    # ------------------------------------------------------------------------- deciding

    def _decide(self, loss: Tensor | None, probes: _Probes, batch_statistics: bool) -> None:
        graph, spent = self.graph, defaultdict(int)  # products by probe position
        users = consumers(loss.grad_fn) if loss is not None else {}
        admitted: dict[int, _Layer] = {}
        for layer in self.layers:
            if layer.refusal is None:
                layer.refusal = self._admit(layer, users)
            if layer.refusal is None:
                admitted[layer.position] = layer
        for layer in admitted.values():
            if graph.grads[layer.position] is None:
                layer.method, layer.detail = "zero", "the loss is linear in its output"
        curved = {i: layer for i, layer in admitted.items() if layer.method != "zero"}
        candidates = {i: self._candidate(layer) for i, layer in curved.items()}
        self.output = probes.output
        self.output_position = probes.output_position
        self.factored: dict[int, _Layer] = {}
        self.rules: dict[int, contraction.Rule] = {}
        untouched = self.output is not None and self.output.grad_fn is probes.output_node
        factorable = None  # layers that may take the Gauss-Newton rule, by graph facts
        if loss is not None and untouched and probes.output_calls == 1:  # not modified in place
            factorable = self._factorable(loss, curved, candidates)
        self.over_budget = self._lower_bound(admitted, candidates, factorable) > self.budget
        if self.over_budget:  # no check is run: every layer would be generic anyway
            for layer in curved.values():
                layer.refusal = "the diagonal would take more products than the budget given"
        else:
            if factorable is not None:
                self._gauss_newton(*factorable, curved, spent)
            rest = {i: c for i, c in candidates.items() if i not in self.factored}
            self.rules = plan.rules(graph, rest, spent, self.chunk_size, batch_statistics)
        for i, rule in self.rules.items():
            layer = curved[i]
            layer.method, layer.detail = "layer", plan.describe(rule)
            spent[i] += rule.count
        for layer in curved.values():
            if layer.method == "generic":
                layer.refusal = "its rule would take more products than the generic path"
        covered = {
            i
            for layer in admitted.values()
            if layer.method != "generic"
            for i in layer.roles.values()
        }
        self.generic = [i for i in range(len(self.params)) if i not in covered]
        self.costs = [
            self.params[i].numel() if i in self.generic and graph.grads[i] is not None else 0
            for i in range(len(self.params))
        ]
        for position, products in spent.items():
            roles = admitted[position].roles.values()
            sizes = {i: self.params[i].numel() for i in roles}
            for i, share in plan.shares(products, sizes).items():
                self.costs[i] += share
        self.entries = self._entries(covered)

    def _admit(self, layer: _Layer, users: dict[object, list[object]]) -> str | None:
        """Why the layer's rule does not hold for this forward pass, or ``None`` if it does."""
        if layer.calls == 0:
            return "it is not called in the forward pass (its parameters are used directly)"
        if layer.calls > 1:
            return f"it is called {layer.calls} times in the forward pass"
        if layer.layout is None:
            return "its output is not a tensor that depends on the parameters"
        chains = layer.layout.chains
        for role in layer.roles:
            if not chains.get(role):
                return f"its {role} does not enter its output as the layer's operation does"
        top = next(iter(chains.values()))[-1]
        if users.get(top) != [layer.summed]:
            if not users.get(top):
                return "its output does not reach the loss"
            return "its output is also read elsewhere (a hook, a cache, the loss)"
        for role in layer.roles:
            if not private(chains[role], layer.summed, users):
                if not users.get(chains[role][0]):
                    return f"its {role} does not reach the loss"
                return f"its {role} is also used outside the layer (tied, or a penalty)"
        return None

    def _candidate(self, layer: _Layer) -> plan.Candidate:
        probe = self.graph.params[layer.position]
        generic = sum(
            self.params[i].numel() for i in layer.roles.values() if self.graph.grads[i] is not None
        )
        layout = layer.layout
        return plan.Candidate(layer.position, probe, layout.unit, set(layout.coupled), generic)  # type: ignore[union-attr]

    def _factorable(
        self, loss: Tensor, curved: dict[int, _Layer], candidates: dict[int, plan.Candidate]
    ) -> tuple[dict[int, int], int] | None:
        """The layers the Gauss-Newton rule may take, by facts of the graph (no product).

        Returns:
            Their own products at most, by probe position, and the outputs per sample; or
            ``None`` when no layer qualifies.
        """
        probe = self.graph.params[self.output_position]
        samples = probe.shape[0] if probe.dim() else 0
        eligible = {
            i: c
            for i, c in candidates.items()
            if not curved[i].layout.lookup and c.axes[:1] == [0] and c.probe.shape[0] == samples  # type: ignore[union-attr]
        }
        if not eligible or samples == 0 or not gauss_newton.output_blocks_fit(probe):
            return None
        probes = [c.probe for c in eligible.values()]
        linear = gauss_newton.piecewise_linear(loss, self.output, probes)  # type: ignore[arg-type]
        own = {i: c.own() for (i, c), ok in zip(eligible.items(), linear) if ok}
        return (own, probe.numel() // samples) if own else None

    def _lower_bound(
        self,
        admitted: dict[int, _Layer],
        candidates: dict[int, plan.Candidate],
        factorable: tuple[dict[int, int], int] | None,
    ) -> float:
        """Fewest products the diagonal could take, were every check passed for free."""
        if self.budget == math.inf:
            return 0
        covered = {i for layer in admitted.values() for i in layer.roles.values()}
        bound = sum(
            p.numel()
            for i, p in enumerate(self.params)
            if i not in covered and self.graph.grads[i] is not None
        )
        cheapest = {i: min(c.generic, c.cost(c.coupled)) for i, c in candidates.items()}
        own, size = factorable or ({}, 0)
        bound += sum(v for i, v in cheapest.items() if i not in own)
        return bound + min(sum(cheapest[i] for i in own), 2 * size) if own else bound

    def _gauss_newton(
        self,
        own: dict[int, int],
        size: int,
        curved: dict[int, _Layer],
        spent: dict[int, int],
    ) -> None:
        """Admit the layers that take the Gauss-Newton rule together, where it is cheaper."""
        graph, output = self.graph, self.output
        probe = graph.params[self.output_position]
        samples = probe.shape[0]
        cost, first = gauss_newton.cost(samples, size), next(iter(own))
        if cost >= sum(own.values()):
            return
        before, passes, factored = graph.num_products, 0, []
        members = [(self.output_position, probe, 0)]
        if not hessian_reached(graph, members, self.chunk_size):  # type: ignore[arg-type]
            probes = [graph.params[i] for i in own]
            reached = gauss_newton.jacobian_reached(output, probes)  # type: ignore[arg-type]
            factored, passes = [i for i, hit in zip(own, reached) if not hit], count(samples)
        checks = graph.num_products - before + passes
        own = {i: own[i] for i in factored}
        if cost >= sum(own.values()):
            spent[first] += checks  # the checks' products count for the first candidate
            return
        for i, share in plan.shares(checks + 2 * size, own).items():
            spent[i] += share
        self.factored = {i: curved[i] for i in factored}
        detail = f"{size} outputs per sample; piecewise-linear path to the model's output"
        for layer in self.factored.values():
            layer.method, layer.detail = "gauss-newton", detail

    def _entries(self, covered: set[int]) -> list[PlanEntry]:
        """The plan, one entry per module owning selected parameters, in parameter order."""
        by_param = {i: layer for layer in self.layers for i in layer.roles.values()}
        groups: dict[tuple[str, str, str], list[int]] = defaultdict(list)
        for i, name in enumerate(self.names):
            layer = by_param.get(i)
            module = layer.name if layer else name.rpartition(".")[0]
            if i in covered:
                method, reason = layer.method, layer.detail  # type: ignore[union-attr]
            elif self.graph.grads[i] is None:
                method, reason = "zero", "its gradient is constant (the loss is linear in it)"
            elif layer is not None:
                method, reason = "generic", layer.refusal or ""
            else:
                method, reason = "generic", f"no layer rule for {self.owners.get(i, 'its owner')}"
            groups[(module, method, reason)].append(i)
        return [
            PlanEntry(module, tuple(indices), method, sum(self.costs[i] for i in indices), reason)
            for (module, method, reason), indices in sorted(groups.items(), key=lambda g: g[1][0])
        ]

    # ------------------------------------------------------------------------- computing

    def run(self, progress: bool = False) -> list[Tensor]:
        """Compute the diagonal as planned (the products the plan counted, no more)."""
        graph, params = self.graph, self.params
        remaining = sum(rule.count for rule in self.rules.values())
        remaining += sum(params[i].numel() for i in self.generic if graph.grads[i] is not None)
        diagonal: list[Tensor | None] = [None] * len(params)
        if self.factored:
            layers = [
                (graph.params[i], _features(layer), layer.layout.unit)  # type: ignore[union-attr]
                for i, layer in self.factored.items()
            ]
            sums = gauss_newton.diagonals(
                graph,
                self.output,
                self.output_position,
                layers,
                self.chunk_size,  # type: ignore[arg-type]
            )
            for layer, (weight, bias) in zip(self.factored.values(), sums):
                self._assign(diagonal, layer, contraction.shaped(layer.layout, weight, bias))  # type: ignore[arg-type]
        self.output = None
        hint = "hessian_diagonal_estimate estimates it from far fewer products."
        with counted(graph, self.fname, remaining, progress, "exact diagonal", hint):
            for layer in self.layers:
                if layer.method == "zero":
                    zeros = {role: torch.zeros_like(params[i]) for role, i in layer.roles.items()}
                    self._assign(diagonal, layer, zeros)
                elif layer.method == "layer":
                    rule, layout = self.rules[layer.position], layer.layout
                    values = contraction.apply(
                        graph,
                        layer.position,
                        layout,
                        _features(layer),
                        rule,
                        self.chunk_size,  # type: ignore[arg-type]
                    )
                    self._assign(diagonal, layer, values)
            for i in self.generic:
                diagonal[i] = graph.own_diagonal(i, chunk_size=self.chunk_size)
        return diagonal  # type: ignore[return-value]

    @staticmethod
    def _assign(diagonal: list[Tensor | None], layer: _Layer, values: dict[str, Tensor]) -> None:
        for role, i in layer.roles.items():
            diagonal[i] = values[role]


def _features(layer: _Layer) -> Tensor | None:
    """The layer's features, computed now, where its selected parameters need them."""
    layout = layer.layout
    wanted = "weight" in layer.roles or layout.lookup  # type: ignore[union-attr]
    return layout.features() if wanted and layout.features is not None else None  # type: ignore[union-attr]


def _candidates(model: nn.Module, params: list[Tensor]) -> list[_Layer]:
    """Modules with a rule that own selected parameters, in the order of ``named_modules``."""
    position = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, int] = defaultdict(int)
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None:
                owners[id(p)] += 1
    layers = []
    for name, module in model.named_modules():
        rule = rule_for(module)
        if rule is None:  # (a TorchScript module among them: no rule, the generic path)
            continue
        roles = {
            role: position[id(p)]
            for role in ("weight", "bias")
            if (p := module._parameters.get(role)) is not None and id(p) in position
        }
        if not roles:
            continue
        layer = _Layer(module, name, rule, roles)
        shared = [role for role, i in roles.items() if owners[id(params[i])] > 1]
        hooked = [role for role, i in roles.items() if params[i]._backward_hooks]
        if shared:
            layer.refusal = f"its {shared[0]} is registered in another module too"
        elif hooked:  # (the rules read the diagonal off the layer's output, past the hook)
            layer.refusal = f"its {hooked[0]} has a gradient hook (register_hook)"
        layers.append(layer)
    return layers


def _owner_types(model: nn.Module, params: list[Tensor]) -> dict[int, str]:
    """The class name of the module owning each selected parameter (the first, if several)."""
    position = {id(p): i for i, p in enumerate(params)}
    owners: dict[int, str] = {}
    for module in model.modules():
        for p in module._parameters.values():
            if p is not None and id(p) in position:
                owners.setdefault(position[id(p)], type(module).__name__)
    return owners


def _backward_hooked(model: nn.Module) -> str | None:
    """Why a module backward hook of the model keeps every rule out, or ``None``."""
    module_hooks = torch.nn.modules.module
    if module_hooks._global_backward_hooks or module_hooks._global_backward_pre_hooks:
        return "a global module backward hook is registered"
    for name, module in model.named_modules():
        if module._backward_hooks or module._backward_pre_hooks:
            return f"module {name or '(root)'!r} has a backward hook"
    return None


def _batch_statistics(model: nn.Module) -> bool:
    """Whether a BatchNorm layer of the model normalises with the batch's statistics."""
    return any(
        isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or m.running_mean is None)
        for m in model.modules()
    )
