"""The token and sequence families: embeddings, recurrent layers, attention and operations
along the positions."""

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from tests.core.fuzz.base import BuilderBase, Made, Shape
from tests.core.fuzz.modules import Attention, Fn, Recurrent, SelfAttention


class Sequences(BuilderBase):
    """Draws the stems and operations of token, recurrent and sequence-first models."""

    def _embedding(self, vocabulary: int, width: int) -> nn.Embedding:
        padding = self.draw.choice(range(vocabulary)) if self.draw.coin(0.3) else None
        self.tags.add("Embedding" if padding is None else "Embedding(padding_idx)")
        self._stem_text = f"Embedding({vocabulary},{width}{f',pad={padding}' if padding else ''})"
        self.fresh = False
        return nn.Embedding(vocabulary, width, padding_idx=padding)

    def _stem_tokens(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        vocabulary, length, width = d.int(4, 7), d.int(2, 4), d.int(3, 6)
        self.vocabulary = vocabulary
        self.embedding = self._embedding(vocabulary, width)
        self._stem_text = f"tokens {length} > {self._stem_text}"
        return self.embedding, (length, width), lambda n: d.randint(vocabulary, n, length)

    def _stem_unbatched(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        vocabulary, width = d.int(4, 7), d.int(3, 5)
        self.vocabulary = vocabulary
        self.embedding = self._embedding(vocabulary, width)
        self._stem_text = f"one unbatched sequence > {self._stem_text}"
        self.tags.add("unbatched")
        if d.coin(0.6):  # the classic: every position reads position 0
            self.parts.append("x + x[:1]")
            self.tags.add("token-0-added")
            stem = nn.Sequential(self.embedding, Fn("x + x[:1]", lambda x: x + x[:1]))
            return stem, (width,), lambda n: d.randint(vocabulary, n)
        return self.embedding, (width,), lambda n: d.randint(vocabulary, n)

    def _recurrent(self, width: int, batch_first: bool) -> tuple[nn.Module, int]:
        d = self.draw
        kind = d.choice(["RNN", "GRU", "LSTM"])
        hidden, layers, both = d.int(2, 3), d.weighted({1: 3, 2: 1}), d.coin(0.3)
        rnn = getattr(nn, kind)(
            width, hidden, num_layers=layers, bidirectional=both, batch_first=batch_first
        )
        self.tags.add(kind)
        self.sequential = True
        text = f"{kind}({width},{hidden}{',2 layers' if layers > 1 else ''}{',bi' if both else ''})"
        self.parts.append(text)
        return Recurrent(rnn), hidden * (2 if both else 1)

    def _stem_rnn(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        length, width = d.int(2, 4), d.int(1, 3)
        stem, hidden = self._recurrent(width, batch_first=True)
        self._stem_text = f"sequence {length}x{width} > {self.parts.pop()}"
        return stem, (length, hidden), lambda n: d.randn(n, length, width)

    def _stem_seq(self) -> tuple[nn.Module, Shape, Callable[[int], Any]]:
        d = self.draw
        length, width = d.int(2, 4), d.int(1, 3)
        self.length = length
        self.tags.add("sequence-first")
        if d.coin(0.5):
            stem, hidden = self._recurrent(width, batch_first=False)
            text = self.parts.pop()
        else:
            hidden = d.int(2, 4)
            stem, text = nn.Linear(width, hidden), f"Linear({width},{hidden})"
            self.fresh = True
        self._stem_text = f"sequence-first {length}xNx{width} > {text}"
        return stem, (None, hidden), lambda n: d.randn(length, n, width)

    def _attention(self, shape: Shape) -> Made:
        """Attention over the tokens (axis 1), or over time (axis 0) in a sequence-first model."""
        d = self.draw
        width = shape[-1]
        first = shape[0] is None
        kind = d.choice(["MultiheadAttention", "attention(softmax)", "attention(linear)"])
        if first or kind == "MultiheadAttention":
            heads = d.choice([h for h in (1, 2) if width % h == 0])
            causal = d.coin(0.3)
            attention = nn.MultiheadAttention(width, heads, bias=d.coin(0.7), batch_first=not first)
            self.sequential = True
            text = f"MultiheadAttention({width},{heads} heads{',causal' if causal else ''})"
            return self._add(SelfAttention(attention, causal), shape, text, "MultiheadAttention")
        if kind == "attention(softmax)" and d.coin(0.4) and width % 2 == 0:
            layer = nn.TransformerEncoderLayer(width, 2, 2 * width, 0.0, batch_first=True)
            self.sequential = True
            return self._add(
                layer, shape, f"TransformerEncoderLayer({width})", "TransformerEncoderLayer"
            )
        softmax, causal = kind == "attention(softmax)", d.coin(0.3)
        text = f"{kind}({width}{',causal' if causal else ''})"
        return self._add(Attention(width, softmax, causal), shape, text, kind)

    def _token_op(self, shape: Shape) -> Made:
        """Positions reading each other: along axis 1 (tokens), or axis 0 when that is time."""
        if shape[0] is None:
            return self._batch_coupling(shape)
        kind = self.draw.choice(
            ["token-0-added", "roll(tokens)", "cumsum(tokens)", "x-mean(tokens)"]
        )
        fns = {
            "token-0-added": (lambda x: x + x[:, :1], "x + x[:, :1]"),
            "roll(tokens)": (lambda x: x + torch.roll(x, 1, 1), "x + roll(x, 1, tokens)"),
            "cumsum(tokens)": (lambda x: x.cumsum(1), "cumsum(tokens)"),
            "x-mean(tokens)": (lambda x: x - x.mean(1, keepdim=True), "x - mean(tokens)"),
        }
        fn, text = fns[kind]
        return self._add(Fn(text, fn), shape, text, kind)

    def _rnn_op(self, shape: Shape) -> Made:
        module, hidden = self._recurrent(shape[-1], batch_first=True)
        text = self.parts.pop()
        return self._add(module, (*shape[:-1], hidden), text)
