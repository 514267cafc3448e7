"""Lectures 5 and 6: linear and logistic regression on three points."""

import torch
from torch import nn


class LinearModel(nn.Module):
    """L5: y = w * x + b."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(x)


class LogisticRegressionModel(nn.Module):
    """L6: P(pass) = sigmoid(w * hours + b)."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.linear(x))
