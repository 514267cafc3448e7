"""Lecture 13: which country does a name come from? A bidirectional GRU over characters."""

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence


class NamesGRU(nn.Module):
    """Embedding -> bidirectional GRU over packed sequences -> Linear on both final hidden states.

    No defaults: the sizes are the catalogue's (``model_kwargs`` of ``names_gru``), the vocabulary and the
    classes being the ones its card gives serving.
    """

    def __init__(self, vocab_size: int, hidden_size: int, num_classes: int, num_layers: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, hidden_size, padding_idx=0)
        self.gru = nn.GRU(hidden_size, hidden_size, num_layers, bidirectional=True)
        self.fc = nn.Linear(hidden_size * 2, num_classes)

    def forward(self, chars: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        embedding = self.embedding(chars.t())  # [T, N, hidden]
        packed = pack_padded_sequence(embedding, lengths.cpu(), enforce_sorted=False)
        _, hidden = self.gru(packed)  # [layers * 2, N, hidden]
        hidden_cat = torch.cat([hidden[-1], hidden[-2]], dim=1)
        return self.fc(hidden_cat)
