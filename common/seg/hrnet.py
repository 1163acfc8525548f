"""HRNetV2-W48 as a semantic segmenter (paper §4, A.3, Table 4b), next to Mask2Former.

The backbone is HRNet (Wang et al., 2019) as timm builds it, module for module and with timm's tensor
names, so that timm's ImageNet weights (`timm/hrnet_w48.ms_in1k`, the HRNet authors' ImageNet-1k model)
load by hub id. It is written here rather than imported because timm imports torchvision, whose registry
wheel is a CUDA build that does not import next to the CPU torch the project installs without a GPU.
Differences from timm's classifier: no classification head; the fuse layers upsample bilinearly to the
target size, as HRNet-Semantic-Segmentation's seg_hrnet.py does (timm: nearest x2^k, which needs sizes
divisible by 32).

The head is HRNetV2's (seg_hrnet.py): the four branches upsampled to the highest resolution (1/4),
concatenated, 1x1 conv-BN-ReLU, 1x1 conv to the classes; logits upsampled x4 to the image; per-pixel
cross-entropy with the ignore label 255.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from common import SegGenError

# ---------------------------------------------------------------- recipe (A.3) and architectures

# A.3, "HRNet": "we use the W48 version, and train it for 100K iterations. SGD optimizer is used with a
# starting learning rate of 2x10^-2. A polynomial learning rate scheduler is used with a power parameter set
# to 0.9. The weight decay rate is 10^-4. Random flipping data augmentation is incorporated."
# Momentum 0.9 and batch 16 are HRNet-Semantic-Segmentation's ADE20K config (seg_hrnet_w48_520x520_ohem_sgd_
# lr2e-2_wd1e-4_bs_16_epoch120.yaml); the paper does not state them.
@dataclass(frozen=True)
class HRNetRecipe:
    lr: float = 2e-2  # A.3
    momentum: float = 0.9  # HRNet-Semantic-Segmentation
    weight_decay: float = 1e-4  # A.3 (HRNet's Cityscapes configs use 5e-4)
    poly_power: float = 0.9  # A.3
    max_steps: int = 100_000  # A.3
    batch_size: int = 16  # HRNet-Semantic-Segmentation's ADE20K config ("bs_16")
    augment: str = "flip"  # A.3: random flipping only
    ignore_index: int = 255  # the project's semantic ignore label (ADE20K class 0)


RECIPE = HRNetRecipe()
DEFAULT_WEIGHTS = "timm/hrnet_w48.ms_in1k"  # HRNet-W48 ImageNet-1k (HRNet-Image-Classification), timm names


def _stage(modules, blocks, channels, block="BASIC"):
    return dict(num_modules=modules, block_type=block, num_blocks=list(blocks), num_channels=list(channels))  # lists: JSON round-trip


# timm's hrnet_w48 config (= HRNet-Semantic-Segmentation's seg_hrnet_w48).
W48 = dict(stem_width=64, stage1=_stage(1, (4,), (64,), "BOTTLENECK"), stage2=_stage(1, (4, 4), (48, 96)),
           stage3=_stage(4, (4, 4, 4), (48, 96, 192)), stage4=_stage(3, (4, 4, 4, 4), (48, 96, 192, 384)))
# A width- and depth-reduced HRNet (random weights) that trains on CPU for tests and the toy world.
SMALL = dict(stem_width=16, stage1=_stage(1, (1,), (8,), "BOTTLENECK"), stage2=_stage(1, (1, 1), (8, 16)),
             stage3=_stage(1, (1, 1, 1), (8, 16, 32)), stage4=_stage(1, (1, 1, 1, 1), (8, 16, 32, 64)))
CONFIGS = {"w48": W48, "small": SMALL}


# ---------------------------------------------------------------- HRNet (timm's module names)

def _bn(c):
    return nn.BatchNorm2d(c, momentum=0.1)


def _conv_bn(cin, cout, k, stride=1, relu=False):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), _bn(cout)]
    return nn.Sequential(*layers, nn.ReLU(inplace=True)) if relu else nn.Sequential(*layers)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 3, stride, 1, bias=False), _bn(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False), _bn(planes)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, planes, 1, bias=False), _bn(planes)
        self.conv2, self.bn2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False), _bn(planes)
        self.conv3, self.bn3 = nn.Conv2d(planes, planes * 4, 1, bias=False), _bn(planes * 4)
        self.downsample = downsample

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)))
        y = F.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return F.relu(y + (x if self.downsample is None else self.downsample(x)))


BLOCKS = {"BASIC": BasicBlock, "BOTTLENECK": Bottleneck}


def _blocks(block, cin, planes, n):
    down = _conv_bn(cin, planes * block.expansion, 1) if cin != planes * block.expansion else None
    return nn.Sequential(block(cin, planes, 1, down), *[block(planes * block.expansion, planes) for _ in range(n - 1)])


class HighResolutionModule(nn.Module):
    """Parallel branches, then every branch receives the sum of all (fuse): higher resolutions by strided
    3x3 convs, lower ones by 1x1 conv + upsampling."""

    def __init__(self, block, num_blocks, channels):
        super().__init__()
        n = len(channels)
        self.branches = nn.ModuleList(_blocks(block, c, c, b) for c, b in zip(channels, num_blocks))
        self.fuse_layers = nn.ModuleList() if n == 1 else nn.ModuleList(nn.ModuleList(
            _conv_bn(channels[j], channels[i], 1) if j > i else nn.Identity() if j == i else nn.Sequential(
                *[_conv_bn(channels[j], channels[i] if k == i - j - 1 else channels[j], 3, 2, relu=k < i - j - 1)
                  for k in range(i - j)])
            for j in range(n)) for i in range(n))

    def forward(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        xs = [branch(x) for branch, x in zip(self.branches, xs)]
        if not len(self.fuse_layers):
            return xs
        out = []
        for i, fuse in enumerate(self.fuse_layers):
            y = 0
            for j, f in enumerate(fuse):
                z = f(xs[j])
                if j > i:  # lower resolution -> this branch's size (seg_hrnet.py: bilinear)
                    z = F.interpolate(z, size=xs[i].shape[-2:], mode="bilinear", align_corners=False)
                y = y + z
            out.append(F.relu(y))
        return out


class HRNet(nn.Module):
    """HRNet backbone: stem (two stride-2 3x3 convs, 1/4), then stages of 1, 2, 3, 4 parallel branches at
    1/4, 1/8, 1/16, 1/32. forward -> the four branches [(B, c_k, H/2^(k+2), W/2^(k+2))]."""

    def __init__(self, cfg: dict):
        super().__init__()
        stem = cfg["stem_width"]
        self.conv1, self.bn1 = nn.Conv2d(3, stem, 3, 2, 1, bias=False), _bn(stem)
        self.conv2, self.bn2 = nn.Conv2d(stem, 64, 3, 2, 1, bias=False), _bn(64)
        s1 = cfg["stage1"]
        block = BLOCKS[s1["block_type"]]
        self.layer1 = _blocks(block, 64, s1["num_channels"][0], s1["num_blocks"][0])
        pre = [s1["num_channels"][0] * block.expansion]
        for k in (2, 3, 4):
            s = cfg[f"stage{k}"]
            block = BLOCKS[s["block_type"]]
            cur = [c * block.expansion for c in s["num_channels"]]
            setattr(self, f"transition{k - 1}", nn.ModuleList(
                (nn.Identity() if cur[i] == pre[i] else _conv_bn(pre[i], cur[i], 3, relu=True)) if i < len(pre) else
                nn.Sequential(*[_conv_bn(pre[-1], cur[i] if j == i - len(pre) else pre[-1], 3, 2, relu=True)
                                for j in range(i + 1 - len(pre))])
                for i in range(len(cur))))
            setattr(self, f"stage{k}", nn.Sequential(*[HighResolutionModule(block, s["num_blocks"], cur)
                                                       for _ in range(s["num_modules"])]))
            pre = cur
        self.channels = pre

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        xs = [self.layer1(x)]
        for k in (2, 3, 4):
            transition = getattr(self, f"transition{k - 1}")
            # an existing branch goes through its transition (or as is); a new one from the lowest resolution
            xs = [t(xs[i] if i < len(xs) else xs[-1]) for i, t in enumerate(transition)]
            for module in getattr(self, f"stage{k}"):
                xs = module(xs)
        return xs


# ---------------------------------------------------------------- HRNetV2 segmenter

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # timm's / HRNet-Semantic-Segmentation's input normalisation


class Config:
    """What save() writes as config.json; `save_pretrained(folder)` as transformers' configs have, so that
    train_seg's checkpoints (common/runtime/checkpoint.py) hold a config.json beside accelerate's model.safetensors
    and load() reads a checkpoint folder as it reads a saved model."""

    def __init__(self, cfg: dict, num_classes: int):
        self.cfg, self.num_classes = cfg, num_classes

    def to_dict(self) -> dict:
        return {"model_type": "hrnetv2", "cfg": self.cfg, "num_classes": self.num_classes}

    def save_pretrained(self, folder: str | Path) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "config.json").write_text(json.dumps(self.to_dict(), indent=1))


class HRNetSegmenter(nn.Module):
    """forward(images (B, 3, H, W), normalised) -> logits (B, num_classes, H, W)."""

    def __init__(self, cfg: dict, num_classes: int):
        super().__init__()
        self.cfg, self.num_classes = cfg, num_classes
        self.config = Config(cfg, num_classes)
        self.backbone = HRNet(cfg)
        c = sum(self.backbone.channels)  # 720 for W48
        self.head = nn.Sequential(nn.Conv2d(c, c, 1), _bn(c), nn.ReLU(inplace=True), nn.Conv2d(c, num_classes, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        xs = self.backbone(images)
        size = xs[0].shape[-2:]  # 1/4 of the image
        x = torch.cat([xs[0]] + [F.interpolate(x, size=size, mode="bilinear", align_corners=False) for x in xs[1:]], 1)
        logits = self.head(x)  # (B, C, H/4, W/4)
        return F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)

    @torch.no_grad()
    def semantic(self, images: torch.Tensor) -> torch.Tensor:
        """(B, num_classes, H, W) class probabilities (the scores summed over test views)."""
        return self(images).softmax(1)


def loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = RECIPE.ignore_index) -> torch.Tensor:
    """Per-pixel cross-entropy; labels (B, H, W) train ids, ignore_index (255) left out."""
    return F.cross_entropy(logits, labels.long(), ignore_index=ignore_index)


def build(arch: str = "w48", num_classes: int = 150, weights: str | Path | None = None) -> tuple[HRNetSegmenter, str]:
    """An HRNetV2 segmenter of `arch` ("w48" or "small"). weights (--backbone-weights): None = timm's ImageNet
    HRNet-W48 for w48 (random for small), a hub id or folder holding timm's model.safetensors, or "none".
    Returns (model, what the backbone was loaded from)."""
    from common.seg.backbones import _read_state

    if arch not in CONFIGS:
        raise SegGenError(f"--backbone {arch}: HRNet comes as {', '.join(CONFIGS)}")
    model = HRNetSegmenter(CONFIGS[arch], num_classes)
    source = (DEFAULT_WEIGHTS if arch == "w48" else None) if weights is None else None if str(weights).lower() == "none" else str(weights)
    if source is None:
        return model, "random"
    head = ("incre_modules.", "downsamp_modules.", "final_layer.", "classifier.")  # timm's classification head
    state = {k: v for k, v in _read_state(source, "HRNet").items()
             if not k.startswith(head) and not k.endswith("num_batches_tracked")}
    own = {k: v for k, v in model.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        raise SegGenError(f"--backbone-weights {source}: not timm HRNet weights of the {arch} architecture "
                          f"({len(missing)} tensors missing, {len(unexpected)} unexpected, {len(wrong)} of another "
                          f"shape; e.g. {(missing or unexpected or wrong)[0]}); pass {DEFAULT_WEIGHTS} or none")
    model.backbone.load_state_dict(state, strict=False)
    return model, source


def save(model: HRNetSegmenter, folder: str | Path) -> Path:
    """folder/config.json (architecture, classes) + folder/model.safetensors."""
    from safetensors.torch import save_file

    folder = Path(folder)
    model.config.save_pretrained(folder)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "model.safetensors")
    return folder


def load(folder: str | Path) -> HRNetSegmenter:
    """The segmenter that save() wrote."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise SegGenError(f"--checkpoint {folder}: not an HRNet folder (needs config.json and model.safetensors)")
    meta = json.loads((folder / "config.json").read_text())
    model = HRNetSegmenter(meta["cfg"], meta["num_classes"])
    model.load_state_dict(load_file(folder / "model.safetensors"))
    return model
