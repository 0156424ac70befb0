"""Random small models, losses, data and parameter selections for differential tests.

:func:`build_case` turns a seed into a :class:`FuzzCase`: a float64 model composed from the
operations and modules of :data:`VOCABULARY`, a loss, one batch, a small data set whose last
batch may hold one sample, a parameter selection for ``params=``, and a one-line description.
The families of architectures are MLP-like models on vectors (one or two inputs), CNN-like
models on tiny 1-d and 2-d images, token models with embeddings (batched, and unbatched
sequences), recurrent models, and sequence-first models whose axis 0 is time. The losses are
per-sample, batch-coupling (covariance of the outputs, InfoNCE over the batch), and may read
activations stored by hooks or add weight decay over every parameter of the model. A few
operations have no second derivative in PyTorch (``cdist``): both paths must then raise.

Everything comes from the seed: choices from ``random.Random(seed)``, tensors (data, masks,
indices, running statistics) from a ``torch.Generator`` seeded with it, and module
initializers, which draw from torch's global RNG, run under a forked global RNG seeded with
it. Building a case never advances the global RNG, and a seed always gives the same case.

A case registers its global module hooks only inside :meth:`FuzzCase.active`.

Modules: ``case`` (the vocabulary and :class:`FuzzCase`), ``modules`` (the small
``nn.Module`` classes), ``base`` (the random draw and the builder's shared state),
``builder`` (:func:`build_case`: stem, body, head, data, selection), and the operation
builders ``layers``, ``operations``, ``structures``, ``images``, ``sequences`` and ``losses``.
"""

from tests.core.fuzz.builder import MAX_PARAMETERS, build_case
from tests.core.fuzz.case import ACTIVATIONS, PIECEWISE_LINEAR, VOCABULARY, FuzzCase

__all__ = [
    "ACTIVATIONS",
    "MAX_PARAMETERS",
    "PIECEWISE_LINEAR",
    "VOCABULARY",
    "FuzzCase",
    "build_case",
]
