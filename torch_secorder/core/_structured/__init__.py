r"""The exact Hessian diagonal of a model's loss from the structure of its layers.

A layer (``Linear``, ``Conv1d/2d/3d``, ``Embedding``, BatchNorm, LayerNorm, GroupNorm,
RMSNorm) computes an output :math:`z` linear in its parameters. If the parameters reach the
loss :math:`L` only through :math:`z`, their diagonal follows from :math:`B`, the Hessian of
the loss with respect to :math:`z` (:mod:`.contraction`), which Hessian-vector products with
respect to a zero *probe* tensor :math:`\varepsilon` added to :math:`z` read off (the Hessian
with respect to :math:`\varepsilon` is the one with respect to :math:`z`, downstream curvature
included): :math:`U` products for a ``Linear`` layer of :math:`U` outputs on independent
samples instead of one per weight. Layers whose path to the model's output is piecewise
linear take the Gauss-Newton rule together (:mod:`.gauss_newton`).

**Nothing is assumed; everything a rule needs is proven for this model and batch by facts of
the forward pass, never by agreement within a tolerance.** A layer takes its rule only if:

* it is called exactly once, and its output is the output of its own operation: the rule
  (:mod:`.rules`, one per layer type) matches the autograd node that produced it (an
  ``addmm`` with a transposed weight, a ``convolution`` that is not transposed, a batch norm
  node, ...), and reads the operation's input from that node's saved arguments, not from the
  module's attributes (a subclass or a hook that changes the output changes the node, and is
  refused);
* each selected parameter reaches the loss only through that operation: in the loss's graph
  every node from the parameter to the output has exactly one consumer, the next
  (:mod:`.graph`), so weight decay, tied weights or a penalty on the weight are seen;
* the output itself is read only where the probe is added: its node's one consumer in the
  loss's graph is the addition of the probe, so an earlier forward hook, a global hook or a
  module keeping its output for the loss is seen;
* positions along an axis taken as independent really are: for every ordered pair of
  indices the Hessian block between them is exactly zero (:mod:`.independence`); otherwise
  the axis counts as coupled, which is always exact and costs more products.

A layer whose output has a constant gradient (the loss is linear in it) has zero curvature,
proven by the graph. A parameter not covered by an admitted layer, and every parameter where a
rule would cost more products, takes the generic path: one unit-vector product per element of
its own block. Both paths give the same diagonal to rounding; the plan says, per layer, which
path it takes, its products and why a rule was refused (:class:`.engine.StructuredDiagonal`).
"""

from torch_secorder.core._structured.engine import PlanEntry, StructuredDiagonal

__all__ = ["PlanEntry", "StructuredDiagonal"]
