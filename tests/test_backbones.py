"""common/seg/backbones.py offline: tiny ResNet (torchvision names) and Swin weights saved to a folder load
tensor for tensor into Mask2Former's backbone; the R50's frozen BatchNorm stays unchanged through training
steps while the rest learns; a hub id without internet and wrong weights fail naming --backbone-weights."""

import numpy as np
import pytest
import torch
from conftest import ADE_ROOT
from PIL import Image
from safetensors.torch import save_file
from transformers import Mask2FormerConfig, Mask2FormerForUniversalSegmentation, ResNetConfig, SwinConfig, SwinForImageClassification

from common import SegGenError
from common.seg.backbones import DEFAULT_WEIGHTS, init_backbone
from common.models.tiny import tiny_mask2former

WIDTHS, DEPTHS, STEM = [16, 32, 64, 128], [2, 1, 1, 1], 8  # a bottleneck ResNet, 4 stages


def tiny_r50_mask2former(num_labels=150):
    backbone = ResNetConfig(embedding_size=STEM, hidden_sizes=WIDTHS, depths=DEPTHS, layer_type="bottleneck",
                            out_features=["stage1", "stage2", "stage3", "stage4"])
    config = Mask2FormerConfig(backbone_config=backbone, feature_size=32, mask_feature_size=32, hidden_dim=32,
                               encoder_feedforward_dim=64, dim_feedforward=64, encoder_layers=1, decoder_layers=2,
                               num_attention_heads=2, num_queries=10, num_labels=num_labels, train_num_points=256)
    torch.manual_seed(0)
    return Mask2FormerForUniversalSegmentation(config)


def torchvision_resnet_tensors(seed=1):
    """The state dict torchvision's ResNet(Bottleneck, DEPTHS, width) would have, by its key names, random values."""
    g = torch.Generator().manual_seed(seed)
    out = {}

    def conv(name, o, i, k):
        out[name + ".weight"] = torch.randn(o, i, k, k, generator=g)

    def bn(name, c):
        out[name + ".weight"], out[name + ".bias"] = torch.rand(c, generator=g) + 0.5, torch.randn(c, generator=g)
        out[name + ".running_mean"], out[name + ".running_var"] = torch.randn(c, generator=g), torch.rand(c, generator=g) + 0.5
        out[name + ".num_batches_tracked"] = torch.tensor(7)

    conv("conv1", STEM, 3, 7), bn("bn1", STEM)
    cin = STEM
    for s, (w, d) in enumerate(zip(WIDTHS, DEPTHS), start=1):
        for b in range(d):
            p = f"layer{s}.{b}"
            conv(f"{p}.conv1", w // 4, cin, 1), bn(f"{p}.bn1", w // 4)
            conv(f"{p}.conv2", w // 4, w // 4, 3), bn(f"{p}.bn2", w // 4)
            conv(f"{p}.conv3", w, w // 4, 1), bn(f"{p}.bn3", w)
            if b == 0:
                conv(f"{p}.downsample.0", w, cin, 1), bn(f"{p}.downsample.1", w)
            cin = w
    out["fc.weight"], out["fc.bias"] = torch.randn(10, cin, generator=g), torch.randn(10, generator=g)
    return out


def ade_batch(size=64):
    """Two real ADE20K samples as a Mask2Former batch: pixel values and one mask per present class."""
    pixels, masks, classes = [], [], []
    for i in (1, 2):
        im = Image.open(ADE_ROOT / f"ADEChallengeData2016/images/validation/ADE_val_0000000{i}.jpg").convert("RGB")
        lab = Image.open(ADE_ROOT / f"ADEChallengeData2016/annotations/validation/ADE_val_0000000{i}.png")
        x = torch.from_numpy(np.array(im.resize((size, size), Image.BILINEAR))).permute(2, 0, 1).float() / 127.5 - 1
        y = torch.from_numpy(np.asarray(lab.resize((size, size), Image.NEAREST)).astype(np.int64)) - 1  # 0 -> -1 ignored
        present = [c for c in y.unique().tolist() if c >= 0]
        pixels.append(x)
        masks.append(torch.stack([(y == c).float() for c in present]))
        classes.append(torch.tensor(present))
    return torch.stack(pixels), masks, classes


def test_r50_loads_torchvision_weights_from_folder_and_bn_stays_frozen(tmp_path):
    saved = torchvision_resnet_tensors()
    save_file(saved, tmp_path / "model.safetensors")
    model = tiny_r50_mask2former()
    assert init_backbone(model, "r50", tmp_path) == str(tmp_path)
    enc = model.model.pixel_level_module.encoder
    # A few names spelled out: stem, the 3x3 conv (where torchvision strides), the projection shortcut.
    assert torch.equal(enc.embedder.embedder.convolution.weight, saved["conv1.weight"])
    assert torch.equal(enc.encoder.stages[1].layers[0].layer[1].convolution.weight, saved["layer2.0.conv2.weight"])
    assert enc.encoder.stages[1].layers[0].layer[1].convolution.stride == (2, 2)
    assert torch.equal(enc.encoder.stages[2].layers[0].shortcut.normalization.running_var, saved["layer3.0.downsample.1.running_var"])
    # Every saved tensor (but fc and the counters) is in the backbone, and nothing else is.
    own = enc.state_dict()
    assert len(own) == len([k for k in saved if not k.startswith("fc.") and not k.endswith("num_batches_tracked")])
    assert sorted(v.sum().item() for v in own.values()) == pytest.approx(
        sorted(v.sum().item() for k, v in saved.items() if not k.startswith("fc.") and not k.endswith("num_batches_tracked")))

    # Frozen BN: no BatchNorm parameters to train; statistics and affine unchanged by training, the rest learns.
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    frozen = {k: v.clone() for k, v in own.items() if "normalization" in k}
    convs = {k: v.clone() for k, v in own.items() if "convolution" in k}
    pixels, masks, classes = ade_batch()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    model.train()
    for _ in range(3):
        loss = model(pixel_values=pixels, mask_labels=masks, class_labels=classes).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = enc.state_dict()
    assert all(torch.equal(after[k], v) for k, v in frozen.items())
    assert all(not torch.equal(after[k], v) for k, v in convs.items())


def test_swin_loads_from_a_saved_classifier_folder(tmp_path):
    model, _ = tiny_mask2former()
    enc = model.model.pixel_level_module.encoder
    cfg = SwinConfig(**{k: getattr(enc.config, k) for k in ("image_size", "patch_size", "embed_dim", "depths", "num_heads", "window_size")})
    torch.manual_seed(5)
    SwinForImageClassification(cfg).save_pretrained(tmp_path)  # the layout of microsoft/swin-* on the hub
    saved = SwinForImageClassification.from_pretrained(tmp_path).state_dict()  # swin.*, classifier.*
    norms_before = {k: v.clone() for k, v in enc.state_dict().items() if k.startswith("hidden_states_norms.")}
    init_backbone(model, "swin-t", tmp_path)
    own = enc.state_dict()
    shared = [k for k in own if k in saved]
    assert len(shared) == len(own) - len(norms_before) > 10  # all but the output norms Mask2Former adds
    assert all(torch.equal(own[k], saved[k]) for k in shared)
    assert all(torch.equal(own[k], v) for k, v in norms_before.items())  # these start fresh (ones / zeros)


def test_none_keeps_random_weights_and_still_freezes_r50_bn():
    model = tiny_r50_mask2former()
    before = {k: v.clone() for k, v in model.state_dict().items() if "num_batches_tracked" not in k}
    assert init_backbone(model, "r50", "none") == "random"
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.model.pixel_level_module.encoder.modules())


@pytest.mark.parametrize("backbone", ["r50", "swin-l"])
def test_hub_id_offline_names_the_flag_and_the_fix(backbone):
    model = tiny_r50_mask2former() if backbone == "r50" else tiny_mask2former()[0]
    with pytest.raises(SegGenError, match=r"--backbone-weights .*hf download .*--backbone-weights none") as e:
        init_backbone(model, backbone)  # the default: the official hub id, not in the cache here
    assert DEFAULT_WEIGHTS[backbone] in str(e.value)


def test_wrong_weights_name_the_flag(tmp_path):
    save_file({"conv1.weight": torch.zeros(4, 3, 7, 7)}, tmp_path / "model.safetensors")
    with pytest.raises(SegGenError, match="--backbone-weights .*not torchvision ResNet weights"):
        init_backbone(tiny_r50_mask2former(), "r50", tmp_path)
    with pytest.raises(SegGenError, match="no model.safetensors"):
        init_backbone(tiny_r50_mask2former(), "r50", tmp_path / "..")


def test_train_seg_loads_backbone_weights_from_a_folder_and_keeps_bn_frozen(tmp_path, monkeypatch):
    """The command-line path: --backbone r50 --backbone-weights FOLDER, a few training steps, RUN/model."""
    import json

    from typer.testing import CliRunner

    import train_seg
    from common.seg import model as segmodel

    saved = torchvision_resnet_tensors()
    save_file(saved, tmp_path / "model.safetensors")
    # train_seg's R50 configuration shrunk to the tiny ResNet (the real one is 25 M parameters): its widths,
    # and the tiny head's config in place of the published one.
    heads = tmp_path / "configs"
    heads.mkdir()
    (heads / "mask2former_swin_tiny_ade_semantic_config.json").write_text(tiny_r50_mask2former().config.to_json_string())
    monkeypatch.setattr(segmodel, "CONFIGS", heads)
    monkeypatch.setattr(segmodel, "R50", dict(embedding_size=STEM, depths=DEPTHS, hidden_sizes=WIDTHS))
    steps, lr = 3, 1e-3
    result = CliRunner().invoke(train_seg.app, [str(a) for a in [
        "--data-root", ADE_ROOT, "--strategy", "real", "--backbone", "r50", "--backbone-weights", tmp_path, "--max-steps", steps,
        "--lr", lr, "--batch-size", 2, "--crop", 64, "--eval-size", 32, "--num-workers", 0, "--checkpoint-every", 0,
        "--output-dir", tmp_path / "run"]])
    assert result.exit_code == 0, result.output + repr(result.exception)
    assert json.loads((tmp_path / "run/metrics.json").read_text())["weights"] == str(tmp_path)
    assert json.loads((tmp_path / "run/options.json").read_text())["weights_loaded"] == str(tmp_path)
    trained = Mask2FormerForUniversalSegmentation.from_pretrained(tmp_path / "run/model").model.pixel_level_module.encoder.state_dict()
    # BatchNorm (statistics and affine) exactly the folder's after training; the convolutions the folder's
    # plus at most the steps' AdamW updates at the backbone lr (0.1 x --lr), far from any random start.
    from common.seg.backbones import torchvision_to_transformers_resnet

    expected = torchvision_to_transformers_resnet(saved)
    for k, v in expected.items():
        if "normalization" in k:
            assert torch.equal(trained[k], v), k
        else:
            assert (trained[k] - v).abs().max() <= 2 * steps * 0.1 * lr, k
    assert any(not torch.equal(trained[k], v) for k, v in expected.items() if "convolution" in k)  # the backbone trained
    # Without the flag a fresh model asks for the official ImageNet weights (offline here: the error names the flag).
    result = CliRunner().invoke(train_seg.app, [str(a) for a in [
        "--data-root", ADE_ROOT, "--strategy", "real", "--backbone", "r50", "--max-steps", 1, "--output-dir", tmp_path / "run2"]])
    assert result.exit_code == 2 and f"--backbone-weights {DEFAULT_WEIGHTS['r50']}" in " ".join(result.output.split()), result.output
