"""Every catalogue model builds and maps its card's input shapes to its card's output shapes."""

import pytest
import torch

from training.catalog import CATALOG, Entry
from training.models import build


def example_inputs(entry: Entry, batch: int, steps: int = 7) -> list[torch.Tensor]:
    if entry.task == "names":
        return [torch.randint(1, 128, (batch, steps)), torch.full((batch,), steps, dtype=torch.int64)]
    if entry.task == "hello":
        return [torch.randint(0, len(entry.labels), (batch, steps))]
    shape = [batch if d == -1 else d for d in entry.inputs[0].shape]
    return [torch.randn(*shape)]


@pytest.mark.parametrize("name", list(CATALOG))
@pytest.mark.parametrize("batch", [1, 5])
def test_output_shape_matches_catalogue(name: str, batch: int) -> None:
    entry = CATALOG[name]
    model = build(entry).eval()
    with torch.no_grad():
        out = model(*example_inputs(entry, batch))
    expected = [batch if i == 0 else (7 if d == -1 else d) for i, d in enumerate(entry.outputs[0].shape)]
    assert list(out.shape) == expected
    if entry.outputs[0].name == "probability":
        assert ((out >= 0) & (out <= 1)).all()


def test_course_architectures() -> None:
    """The lecture's layer sizes, which the issue names, are the ones built."""
    sizes = {name: sum(p.numel() for p in build(e).parameters()) for name, e in CATALOG.items()}
    assert sizes["linear_regression"] == 2
    assert sizes["diabetes_mlp"] == (8 * 6 + 6) + (6 * 4 + 4) + (4 * 1 + 1)
    assert sizes["mnist_softmax"] == sum(i * o + o for i, o in [(784, 512), (512, 256), (256, 128), (128, 64),
                                                                 (64, 10)])
    assert sizes["mnist_cnn"] == (1 * 10 * 25 + 10) + (10 * 20 * 25 + 20) + (320 * 10 + 10)
    assert build(CATALOG["mnist_inception"]).fc.in_features == 1408
    assert build(CATALOG["mnist_resnet"]).fc.in_features == 512
    assert sizes["hello_rnncell"] == sizes["hello_rnn"] == 2 * (4 * 4 + 4)
    gru = build(CATALOG["names_gru"]).gru
    assert gru.bidirectional and gru.hidden_size == 100


def test_rnncell_export_form_is_the_same_function() -> None:
    torch.manual_seed(0)
    model = build(CATALOG["hello_rnncell"]).eval()
    chars = torch.randint(0, 4, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(model.export_form()(chars), model(chars), atol=1e-6, rtol=0)
