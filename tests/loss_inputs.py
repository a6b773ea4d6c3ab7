"""Helpers shared by the dense and the sparse kernel tests (loss/test_triton_kernel.py,
test_sparse.py): labels with ignored positions and a max-scaled closeness check."""
import torch


def make_labels(shape, num_classes, ignored=(), seed=1):
    """Class ids in [0, V) with the flat positions in ``ignored`` set to -100."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, num_classes, shape, generator=generator)
    labels.view(-1)[list(ignored)] = -100
    return labels


def assert_close_scaled(actual, expected, rtol, floor=0.0):
    """|actual - expected| <= rtol * (|expected| + max(max |expected|, floor)); NaN never matches."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    scale = max(expected.abs().max().item() if expected.numel() else 0.0, floor)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale + 1e-30)
