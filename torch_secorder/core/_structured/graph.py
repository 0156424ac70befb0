"""Structural facts of an autograd graph: who consumes each node, what depends on what.

Facts, not numbers: a layer's parameters reach the loss only through its output when every
node on their way has exactly one consumer in the loss's graph (:func:`consumers`); a layer's
output reaches a tensor only through another when every path passes it (:func:`reached_from`).
"""

import weakref
from collections import defaultdict
from collections.abc import Sequence

from torch import Tensor

Node = object


class ProbedOutput:
    """A module output to which a probe was added, ``summed = output + probe``, watched.

    The probe makes a new tensor for the rest of the forward pass; the function stays the same
    unless one of the two is modified in place while the other is read: :meth:`altered`.
    """

    def __init__(self, output: Tensor, summed: Tensor) -> None:
        self.held = weakref.ref(output)  # (alive after the pass: held elsewhere)
        self.summed, self.version = summed, summed._version
        self.alias = output.detach()  # (the output's version counter, not a reference to it)
        self.original = self.alias._version

    def altered(self) -> bool:
        """Whether one of the two was modified in place where the other is still read.

        The probed tensor while the output is held elsewhere (the holder no longer sees the
        modification), or the output itself (the rest of the pass no longer does).
        """
        held_apart = self.summed._version != self.version and self.held() is not None
        return held_apart or self.alias._version != self.original


def consumers(root: Node | None) -> dict[Node, list[Node]]:
    """For each node of the graph behind ``root``, the nodes that use it, once per use."""
    users: dict[Node, list[Node]] = defaultdict(list)
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        for following, _ in node.next_functions:  # type: ignore[attr-defined]
            if following is not None:
                users[following].append(node)
                stack.append(following)
    return users


def private(chain: Sequence[Node], last_user: Node, users: dict[Node, list[Node]]) -> bool:
    """Whether each node of ``chain`` is used only by the next, the last only by ``last_user``."""
    following = [*chain[1:], last_user]
    return all(users.get(node) == [user] for node, user in zip(chain, following))


def post_order(root: Node, barrier: Node | None = None) -> list[Node]:
    """The nodes of the graph behind ``root`` up to ``barrier``, each after those it uses."""
    order, seen, stack = [], set(), [(root, False)]
    while stack:
        node, done = stack.pop()
        if done:
            order.append(node)
            continue
        if node in seen or node is barrier:
            continue
        seen.add(node)
        stack.append((node, True))
        stack.extend((n, False) for n, _ in node.next_functions if n is not None)  # type: ignore[attr-defined]
    return order


def dependencies(order: list[Node], index: dict[int, int]) -> dict[Node, frozenset[int]]:
    """For each node of ``order``, the leaves it depends on, by position (``index`` of ids)."""
    depends: dict[Node, frozenset[int]] = {}
    for node in order:
        variable = getattr(node, "variable", None)
        if variable is not None:
            depends[node] = frozenset({index[id(variable)]} if id(variable) in index else ())
            continue
        inputs = [depends.get(n, frozenset()) for n, _ in node.next_functions]  # type: ignore[attr-defined]
        depends[node] = frozenset().union(*inputs)
    return depends


def reached_from(root: Node | None, index: dict[int, int], barrier: Node) -> frozenset[int]:
    """The leaves (by position) the graph behind ``root`` reaches without passing ``barrier``."""
    if root is None:
        return frozenset()
    order = post_order(root, barrier)
    return dependencies(order, index).get(root, frozenset())
