r"""What the structured diagonal does with each layer, and what it costs, decided before the work.

A layer admitted by its rule (:mod:`.rules`) takes one of three paths, whichever takes fewest
products: the Gauss-Newton rule (:mod:`.gauss_newton`, shared by all the layers it admits),
its own rule (:mod:`.contraction`: :math:`U \cdot C` products), or the generic path (one
unit-vector product per parameter element). Its own rule's coupled axes :math:`C` are those
taken as coupled without a check (a convolution's pixels; the samples of a model normalising
with batch statistics) and those the checks of :mod:`.independence` find coupled: the samples
of all layers of one length together, the tokens of a layer one by one where that can save
more products than it takes.
"""

import math
from dataclasses import dataclass

from torch import Tensor

from torch_secorder.core._autograd import GradientGraph
from torch_secorder.core._structured.contraction import Rule
from torch_secorder.core._structured.independence import count, hessian_reached


@dataclass(eq=False)
class Candidate:
    """A layer admitted by its rule, as the plan sees it."""

    position: int  # of its probe among the graph's params
    probe: Tensor
    unit: int
    coupled: set[int]  # axes taken as coupled without a check
    generic: int  # products of its parameters on the generic path

    @property
    def axes(self) -> list[int]:
        """The output axes other than the unit axis."""
        return [a for a in range(self.probe.dim()) if a != self.unit]

    @property
    def units(self) -> int:
        """The layer's units :math:`U`."""
        return self.probe.shape[self.unit]

    def cost(self, coupled: set[int]) -> int:
        """Products of its rule when ``coupled`` are the coupled axes."""
        return self.units * math.prod(self.probe.shape[a] for a in coupled)

    def token_axes(self, coupled: set[int]) -> list[int]:
        """Axes after the first that are not coupled yet (checked one by one)."""
        return [a for a in self.axes[1:] if a not in coupled and self.probe.shape[a] > 1]

    def unchecked(self, coupled: set[int]) -> list[int]:
        """Axes that are not coupled yet (the samples' included)."""
        return [a for a in self.axes if a not in coupled and self.probe.shape[a] > 1]

    def worthwhile(self, coupled: set[int], free: frozenset[int] | set[int] = frozenset()) -> bool:
        """Whether its rule could save as many products as its checks take (and might waste).

        ``free`` are axes whose check runs anyway (the samples' check shared by all layers).
        """
        checks = sum(count(self.probe.shape[a]) for a in self.unchecked(coupled) if a not in free)
        return self.generic - self.cost(coupled) - checks >= max(checks, 1)

    def own(self) -> int:
        """Products of its cheaper path before any check: its rule or the generic path."""
        return min(self.generic, self.cost(self.coupled | set(self.axes[1:])))


def rules(
    graph: GradientGraph,
    candidates: dict[int, Candidate],
    spent: dict[int, int],
    chunk_size: int | None,
    batch_statistics: bool,
) -> dict[int, Rule]:
    """The rules of the candidates (by probe position) that take fewer products than generic.

    Runs the independence checks (their products add to ``spent``, by probe position): the
    samples (axis 0) of all layers of the most common length jointly, the tokens of each
    layer one by one. A layer is checked only where its rule, with all its checks its own,
    would save at least as many products as the checks take: checks that find coupling
    waste at most what they could have saved.
    """
    coupled = {i: set(c.coupled) for i, c in candidates.items()}
    if batch_statistics:  # samples coupled by the norm's statistics: not checked
        for i, c in candidates.items():
            if c.axes[:1] == [0]:
                coupled[i].add(0)
    hopeful = {i: c for i, c in candidates.items() if c.worthwhile(coupled[i])}
    joint = [i for i, c in hopeful.items() if c.axes[:1] == [0] and 0 not in coupled[i]]
    lengths = [hopeful[i].probe.shape[0] for i in joint]
    common = max(set(lengths), key=lengths.count) if lengths else 1
    joint = [i for i in joint if hopeful[i].probe.shape[0] == common]
    if common > 1:  # the samples' check runs anyway: free for the layers of its length
        for i, c in candidates.items():
            alike = c.axes[:1] == [0] and 0 not in coupled[i] and c.probe.shape[0] == common
            if i not in hopeful and alike and c.worthwhile(coupled[i], free={0}):
                hopeful[i] = c
                joint.append(i)
        joint.sort()
    joint_spent = 0
    if common > 1:
        before = graph.num_products
        members = [(i, hopeful[i].probe, 0) for i in joint]
        for i in hessian_reached(graph, members, chunk_size):
            coupled[i].add(0)
        joint_spent = graph.num_products - before
    plans: dict[int, Rule] = {}
    for i, c in hopeful.items():
        if i not in joint and c.axes[:1] == [0] and c.probe.shape[0] > 1:
            coupled[i].add(0)  # a length of its own: not checked
        before = graph.num_products
        for axis in c.token_axes(coupled[i]):
            saving = c.cost(coupled[i] | {axis}) - c.cost(coupled[i])
            if saving <= count(c.probe.shape[axis]) or hessian_reached(
                graph, [(i, c.probe, axis)], chunk_size
            ):
                coupled[i].add(axis)
        spent[i] += graph.num_products - before
        products = c.cost(coupled[i])
        if products < c.generic:
            independent = [a for a in c.axes if a not in coupled[i]]
            plans[i] = Rule(independent, sorted(coupled[i]), c.units, products)
    if joint_spent:  # the joint check counts for the first layer that gained by it
        gainer = next((i for i in joint if i in plans), joint[0])
        spent[gainer] += joint_spent
    return plans


def shares(total: int, weights: dict[int, int]) -> dict[int, int]:
    """``total`` split in proportion to ``weights`` (largest remainders), integers summing to it."""
    whole = sum(weights.values())
    exact = {i: total * w / whole for i, w in weights.items()}
    parts = {i: math.floor(x) for i, x in exact.items()}
    left = total - sum(parts.values())
    for i in sorted(exact, key=lambda i: parts[i] - exact[i])[:left]:
        parts[i] += 1
    return parts


def describe(rule: Rule) -> str:
    """A rule in words: its products, and which output axes are independent or coupled."""
    coupled = rule.count // rule.units

    def axes(indices: list[int]) -> str:
        return ", ".join(map(str, indices)) or "none"

    return (
        f"{rule.units} unit{'s' * (rule.units != 1)} x {coupled} coupled "
        f"position{'s' * (coupled != 1)} (independent "
        f"output axes: {axes(rule.independent)}; coupled: {axes(rule.coupled)})"
    )
