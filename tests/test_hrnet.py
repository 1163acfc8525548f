"""common/seg/hrnet.py: the small HRNetV2 learns 2 real ADE20K samples on CPU, shapes at odd sizes, weights
round-trip through a folder, timm-named backbone weights load, bad folders name the flag."""

import numpy as np
import pytest
import torch
from conftest import ADE_ROOT
from PIL import Image
from safetensors.torch import save_file

from common import SegGenError
from common.seg import hrnet


def ade_pair(size=64):
    """Two real ADE20K validation samples: images (2, 3, s, s) normalised, labels (2, s, s) train ids, 255 ignored."""
    xs, ys = [], []
    for i in (1, 2):
        im = Image.open(ADE_ROOT / f"ADEChallengeData2016/images/validation/ADE_val_0000000{i}.jpg").convert("RGB")
        lab = np.array(Image.open(ADE_ROOT / f"ADEChallengeData2016/annotations/validation/ADE_val_0000000{i}.png").resize((size, size), Image.NEAREST))
        xs.append(torch.from_numpy(np.array(im.resize((size, size), Image.BILINEAR))).permute(2, 0, 1).float() / 127.5 - 1)
        ys.append(torch.from_numpy(np.where(lab == 0, 255, lab.astype(np.int64) - 1)))  # ADE20K 0 -> ignore
    return torch.stack(xs), torch.stack(ys)


def test_small_hrnet_overfits_two_ade20k_samples():
    torch.manual_seed(0)
    model, source = hrnet.build("small", num_classes=150)
    assert source == "random"
    images, labels = ade_pair()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=hrnet.RECIPE.momentum, weight_decay=hrnet.RECIPE.weight_decay)
    valid = labels != 255

    def accuracy():
        model.eval()
        pred = model.semantic(images).argmax(1)
        model.train()
        return (pred == labels)[valid].float().mean().item()

    acc0, losses = accuracy(), []
    for _ in range(25):
        loss = hrnet.loss(model(images), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 3, losses
    assert accuracy() > max(0.6, acc0 + 0.3)


@pytest.mark.parametrize("size", [(64, 64), (72, 100)])
def test_shapes(size):
    model, _ = hrnet.build("small", num_classes=7)
    images = torch.randn(2, 3, *size)
    feats = model.backbone(images)
    assert [f.shape[1] for f in feats] == [8, 16, 32, 64]
    assert feats[0].shape[-2:] == (size[0] // 4, size[1] // 4)
    assert model(images).shape == (2, 7, *size)
    probs = model.eval().semantic(images)
    assert torch.allclose(probs.sum(1), torch.ones(2, *size))


def test_w48_architecture():
    model, _ = hrnet.build("w48", num_classes=150, weights="none")
    assert model.backbone.channels == [48, 96, 192, 384]
    assert model.head[0].in_channels == 720
    # HRNet-W48 without its classification head: 65.3 M parameters (timm hrnet_w48 features, same tensors)
    n = sum(p.numel() for p in model.backbone.parameters())
    assert 60e6 < n < 68e6, n


def test_weights_round_trip_through_a_folder(tmp_path):
    model, _ = hrnet.build("small", num_classes=5)
    hrnet.save(model, tmp_path / "m")
    back = hrnet.load(tmp_path / "m")
    assert back.cfg == hrnet.SMALL and back.num_classes == 5
    a, b = model.state_dict(), back.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(model.eval()(x), back.eval()(x))
    with pytest.raises(SegGenError, match="--checkpoint .*not an HRNet folder"):
        hrnet.load(tmp_path)


def test_backbone_weights_load_from_a_timm_style_folder(tmp_path):
    src, _ = hrnet.build("small", num_classes=3)
    g = torch.Generator().manual_seed(3)
    saved = {k: torch.randn(v.shape, generator=g) if v.is_floating_point() else v for k, v in src.backbone.state_dict().items()}
    saved["classifier.weight"] = torch.zeros(1000, 2048)  # timm's checkpoint carries its classifier: left out
    save_file(saved, tmp_path / "model.safetensors")
    model, source = hrnet.build("small", num_classes=3, weights=tmp_path)
    assert source == str(tmp_path)
    own = model.backbone.state_dict()
    assert all(torch.equal(own[k], saved[k]) for k in own)
    # The stem, a fuse layer and a new-branch transition, by timm's names.
    assert torch.equal(model.backbone.stage3[0].fuse_layers[2][0][1][0].weight, saved["stage3.0.fuse_layers.2.0.1.0.weight"])
    assert torch.equal(model.backbone.transition3[3][0][0].weight, saved["transition3.3.0.0.weight"])


def test_bad_weights_name_the_flag(tmp_path):
    save_file({"conv1.weight": torch.zeros(16, 3, 3, 3)}, tmp_path / "model.safetensors")
    with pytest.raises(SegGenError, match="--backbone-weights .*not timm HRNet weights"):
        hrnet.build("small", weights=tmp_path)
    with pytest.raises(SegGenError, match="--backbone-weights timm/hrnet_w48.ms_in1k.*--backbone-weights none"):
        hrnet.build("w48")  # the default hub id, offline
