"""The CelebA path on a tiny fake CelebA folder in torchvision's layout."""
import pytest
import torch
from PIL import Image

from flowjac import data
from flowjac.models import classifiers
from flowjac.pipelines import celeba as celeba_study

N_IMAGES = 6


def make_fake_celeba(root, n=N_IMAGES, names=data.CELEBA_ATTRIBUTES, seed=0):
    """Write the five text files and n 178x218 JPEGs that torchvision reads."""
    base = root / "celeba"
    (base / "img_align_celeba").mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    files = [f"{i + 1:06d}.jpg" for i in range(n)]
    attrs = torch.randint(0, 2, (n, len(names)), generator=g) * 2 - 1
    for i, f in enumerate(files):
        arr = torch.randint(0, 256, (218, 178, 3), generator=g, dtype=torch.uint8)
        Image.fromarray(arr.numpy()).save(base / "img_align_celeba" / f)
    parts = [0] * (n - 2) + [1, 2]
    (base / "list_eval_partition.txt").write_text(
        "".join(f"{f} {p}\n" for f, p in zip(files, parts)))
    (base / "identity_CelebA.txt").write_text(
        "".join(f"{f} {i + 100}\n" for i, f in enumerate(files)))
    (base / "list_attr_celeba.txt").write_text(
        f"{n}\n" + " ".join(names) + " \n" + "".join(
            f"{f} " + " ".join(f"{a:2d}" for a in row.tolist()) + "\n"
            for f, row in zip(files, attrs)))
    (base / "list_bbox_celeba.txt").write_text(
        f"{n}\nimage_id x_1 y_1 width height\n" + "".join(
            f"{f} 95 71 226 313\n" for f in files))
    lm = "lefteye_x lefteye_y righteye_x righteye_y nose_x nose_y " \
         "leftmouth_x leftmouth_y rightmouth_x rightmouth_y"
    (base / "list_landmarks_align_celeba.txt").write_text(
        f"{n}\n{lm}\n" + "".join(
            f"{f} 69 109 106 113 77 142 73 152 108 154\n" for f in files))
    return (attrs + 1) // 2, parts


def test_fake_celeba_loads_with_names_and_paper_indices(tmp_path):
    attrs, parts = make_fake_celeba(tmp_path)
    d = data.celeba(tmp_path, split="all", check_md5=False, verbose=False)
    assert len(d) == N_IMAGES and d.attr_names == list(data.CELEBA_ATTRIBUTES)
    assert torch.equal(d.labels, attrs)
    x, y = d.tensors(3)
    assert x.shape == (3, 3, 64, 64) and x.dtype == torch.float32
    assert 0.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert torch.equal(y, attrs[:3])
    assert d.attr_names[d.paper_index(19)] == "Heavy_Makeup"
    assert d.attr_names[d.paper_index(28)] == "Pointy_Nose"
    assert d.attr_names[d.paper_index(30)] == "Rosy_Cheeks"
    assert d.index("Heavy_Makeup") == 18
    train = data.celeba(tmp_path, split="train", check_md5=False, verbose=False)
    assert len(train) == parts.count(0)


def test_paper_indices_are_mapped_by_name_not_position(tmp_path):
    names = list(data.CELEBA_ATTRIBUTES)
    names.reverse()                  # a file with another column order
    attrs, _ = make_fake_celeba(tmp_path, names=names)
    d = data.celeba(tmp_path, split="all", image_size=32, check_md5=False,
                 verbose=False)
    j = d.paper_index(19)
    assert d.attr_names[j] == "Heavy_Makeup" and j == 40 - 19
    assert torch.equal(d.labels[:, j], attrs[:, names.index("Heavy_Makeup")])
    assert d.tensors(1)[0].shape == (1, 3, 32, 32)


def test_fake_files_fail_the_md5_check_clearly(tmp_path):
    make_fake_celeba(tmp_path)
    with pytest.raises(ValueError, match="check_md5=False"):
        data.celeba(tmp_path, verbose=False)


def test_missing_files_say_where_to_put_them(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        data.celeba(tmp_path, verbose=False)
    msg = str(err.value)
    assert str(tmp_path / "celeba") in msg and "list_attr_celeba.txt" in msg
    assert "img_align_celeba" in msg


@pytest.mark.parametrize("kw", [dict(split="val"), dict(image_size=4),
                                dict(image_size=64.0)])
def test_bad_arguments(tmp_path, kw):
    with pytest.raises(ValueError):
        data.celeba(tmp_path, **kw)


def test_bad_paper_index(tmp_path):
    make_fake_celeba(tmp_path)
    d = data.celeba(tmp_path, split="all", check_md5=False, verbose=False)
    with pytest.raises(ValueError, match="one_based"):
        d.paper_index(0)
    with pytest.raises(ValueError, match="name"):
        d.index("Heavy Makeup")


def test_resnet50_head_and_one_training_step(tmp_path):
    make_fake_celeba(tmp_path)
    d = data.celeba(tmp_path, split="all", check_md5=False, verbose=False)
    x, y = d.tensors(4)
    torch.manual_seed(0)
    net = classifiers.celeba_resnet50()
    assert net(x).shape == (4, 40)
    hist = classifiers.train_classifier(net, x, y, steps=1, batch_size=2, lr=classifiers.CELEBA_LR)
    assert len(hist["loss"]) == 1 and hist["loss"][0] > 0
    assert classifiers.CELEBA_BATCH_SIZE == 128 and classifiers.CELEBA_LR == 2e-4


def test_resnet50_loads_user_weights(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    ref = resnet50(weights=None)
    path = tmp_path / "r50.pt"
    torch.save(ref.state_dict(), path)
    net = classifiers.celeba_resnet50(path)
    assert torch.equal(net[1].conv1.weight, ref.conv1.weight)
    assert net[1].fc.out_features == 40
    with pytest.raises(FileNotFoundError, match="weights_path"):
        classifiers.celeba_resnet50(tmp_path / "nope.pt")
    torch.save({"foo": torch.zeros(1)}, tmp_path / "bad.pt")
    with pytest.raises(ValueError, match="weights_path"):
        classifiers.celeba_resnet50(tmp_path / "bad.pt")


def test_celeba_pipeline_end_to_end_on_a_fake_folder(tmp_path):
    """Flow, ResNet50, probes, Table 6, Figure 5 and PC on a fake CelebA at toy sizes."""
    import numpy as np


    make_fake_celeba(tmp_path, n=24)
    out = celeba_study.run_celeba(tmp_path, tmp_path / "out", config="toy",
                                  check_md5=False)
    names = out["names"]
    assert names[out["heavy_makeup"]] == "Heavy_Makeup"
    assert names[out["pointy_nose"]] == "Pointy_Nose"
    assert names[out["rosy_cheeks"]] == "Rosy_Cheeks"
    t6 = out["table6"]
    assert t6["all"]["n"] == 4 and t6["data"]["n"] == 22   # the train split
    assert t6["predicted Heavy_Makeup = 0"]["n"] + \
        t6["predicted Heavy_Makeup = 1"]["n"] == 4
    mats = out["figure5"]["matrices"]
    assert all(m.shape == (40, 40) for m in mats.values())
    assert np.allclose(np.diag(mats["data"]), 1.0)
    assert set(out["figure5"]["mae"]) == {"paper (JVP)", "identity (JVP)",
                                         "samples", "zeros"}
    assert out["pc"]["graph"].shape == (40, 40)
    assert (tmp_path / "out" / "celeba_flow.pt").exists()
    assert (tmp_path / "out" / "celeba_classifier.pt").exists()
    # a second run loads the cached models and gives the same probes
    again = celeba_study.run_celeba(tmp_path, tmp_path / "out", config="toy",
                                    check_md5=False)
    np.testing.assert_equal(again["table6"]["all"], t6["all"])   # nan == nan here
    with pytest.raises(ValueError, match="unknown settings"):
        celeba_study.run_celeba(tmp_path, tmp_path / "out", config="toy",
                                check_md5=False, nonsense=1)
