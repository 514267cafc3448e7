"""The course's models, one module per lecture family; ``build`` makes one from its catalogue entry."""

from torch import nn

from .advanced_cnn import InceptionNet, ResNet
from .cnn import BasicCNN
from .diabetes import DiabetesMLP
from .names import NamesGRU
from .regression import LinearModel, LogisticRegressionModel
from .rnn import HelloEmbedding, HelloRNN, HelloRNNCell
from .softmax import SoftmaxMLP

ARCHITECTURES: dict[str, type[nn.Module]] = {cls.__name__: cls for cls in (
    LinearModel, LogisticRegressionModel, DiabetesMLP, SoftmaxMLP, BasicCNN, InceptionNet, ResNet,
    HelloRNNCell, HelloRNN, HelloEmbedding, NamesGRU,
)}


def build(entry) -> nn.Module:
    """Instantiate the architecture a catalogue entry names."""
    return ARCHITECTURES[entry.architecture](**entry.model_kwargs)
