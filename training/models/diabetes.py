"""Lectures 7-8: a multi-layer sigmoid network on the diabetes data set."""

import torch
from torch import nn


class DiabetesMLP(nn.Module):
    """8 -> 6 -> 4 -> 1, sigmoid after every layer, as in the course."""

    def __init__(self) -> None:
        super().__init__()
        self.linear1 = nn.Linear(8, 6)
        self.linear2 = nn.Linear(6, 4)
        self.linear3 = nn.Linear(4, 1)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.sigmoid(self.linear1(x))
        x = self.sigmoid(self.linear2(x))
        return self.sigmoid(self.linear3(x))
