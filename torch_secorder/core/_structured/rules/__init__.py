"""The table of layer rules: one per layer type, each in its own module.

:func:`rule_for` gives a module its rule: the first entry whose types the module is an
instance of (subclasses included; a subclass that changes the operation is refused by the
rule's match of the graph).
"""

from torch import nn

from torch_secorder.core._structured.rules.base import LayerRule, Layout
from torch_secorder.core._structured.rules.batchnorm import BatchNormRule
from torch_secorder.core._structured.rules.conv import ConvolutionRule
from torch_secorder.core._structured.rules.embedding import EmbeddingRule
from torch_secorder.core._structured.rules.groupnorm import GroupNormRule
from torch_secorder.core._structured.rules.layernorm import LayerNormRule
from torch_secorder.core._structured.rules.linear import LinearRule
from torch_secorder.core._structured.rules.rmsnorm import RMSNormRule

__all__ = ["RULES", "LayerRule", "Layout", "rule_for"]

RULES: list[LayerRule] = [
    LinearRule(),
    ConvolutionRule(),
    EmbeddingRule(),
    BatchNormRule(),
    LayerNormRule(),
    GroupNormRule(),
    RMSNormRule(),
]
"""The registered rules, in the order they are tried."""


def rule_for(module: nn.Module) -> LayerRule | None:
    """The rule for ``module``'s type, or ``None``."""
    return next((rule for rule in RULES if rule.types and isinstance(module, rule.types)), None)
