"""Lecture 9: a fully connected softmax classifier for MNIST."""

import torch
import torch.nn.functional as F
from torch import nn


class SoftmaxMLP(nn.Module):
    """784-512-256-128-64-10 with ReLU; returns logits (CrossEntropyLoss applies the softmax)."""

    def __init__(self) -> None:
        super().__init__()
        self.l1 = nn.Linear(784, 512)
        self.l2 = nn.Linear(512, 256)
        self.l3 = nn.Linear(256, 128)
        self.l4 = nn.Linear(128, 64)
        self.l5 = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.view(-1, 784)
        x = F.relu(self.l1(x))
        x = F.relu(self.l2(x))
        x = F.relu(self.l3(x))
        x = F.relu(self.l4(x))
        return self.l5(x)
