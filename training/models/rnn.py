"""Lecture 12: learning "hello" -> "ohlol" with RNNCell, RNN and Embedding.

All three take character indices ``chars`` [N, T] (into the catalogue's ``HELLO_VOCAB``) and return
``logits`` [N, T, 4], so they share one exported interface; the course's one-hot encoding is done
inside ``forward`` by indexing an identity matrix.
"""

import torch
from torch import nn

from training.catalog import HELLO_VOCAB

VOCAB_SIZE = len(HELLO_VOCAB)


class HelloRNNCell(nn.Module):
    """RNNCell(4, 4) stepped by hand over the sequence; the hidden state is the output, hence its size."""

    def __init__(self, hidden_size: int = VOCAB_SIZE) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.register_buffer("one_hot", torch.eye(VOCAB_SIZE))
        self.rnncell = nn.RNNCell(input_size=VOCAB_SIZE, hidden_size=hidden_size)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        x = self.one_hot[chars]  # [N, T, 4]
        hidden = self.rnncell(x[:, 0])  # the first step starts from a zero hidden state
        outputs = [hidden]
        for t in range(1, x.size(1)):
            hidden = self.rnncell(x[:, t], hidden)
            outputs.append(hidden)
        return torch.stack(outputs, dim=1)

    def export_form(self) -> nn.Module:
        """The same function as an ``nn.RNN`` for ONNX, which has no RNNCell operator.

        Stepping an RNNCell from a zero state computes exactly what a one-layer RNN with the same
        weights computes; export checks the two agree before anything is written.
        """
        seq = HelloRNN(hidden_size=self.hidden_size)
        seq.rnn.weight_ih_l0.data.copy_(self.rnncell.weight_ih)
        seq.rnn.weight_hh_l0.data.copy_(self.rnncell.weight_hh)
        seq.rnn.bias_ih_l0.data.copy_(self.rnncell.bias_ih)
        seq.rnn.bias_hh_l0.data.copy_(self.rnncell.bias_hh)
        return seq.eval()


class HelloRNN(nn.Module):
    """RNN(4, 4): the whole sequence in one call; the hidden state is the output, hence its size."""

    def __init__(self, hidden_size: int = VOCAB_SIZE, num_layers: int = 1) -> None:
        super().__init__()
        self.register_buffer("one_hot", torch.eye(VOCAB_SIZE))
        self.rnn = nn.RNN(input_size=VOCAB_SIZE, hidden_size=hidden_size, num_layers=num_layers,
                          batch_first=True)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.one_hot[chars])
        return out


class HelloEmbedding(nn.Module):
    """Embedding(4, 10) -> RNN(10, 8, 2 layers) -> Linear(8, 4)."""

    def __init__(self, embedding_size: int = 10, hidden_size: int = 8, num_layers: int = 2) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB_SIZE, embedding_size)
        self.rnn = nn.RNN(input_size=embedding_size, hidden_size=hidden_size, num_layers=num_layers,
                          batch_first=True)
        self.fc = nn.Linear(hidden_size, VOCAB_SIZE)

    def forward(self, chars: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.emb(chars))
        return self.fc(out)
