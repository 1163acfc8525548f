"""ImageNet backbones for Mask2Former, as the official recipe starts from them (A.3: "we keep the official
implementation and training hyper-parameters").

Mask2Former (facebookresearch/Mask2Former) initialises its backbone from ImageNet weights and trains the
rest from scratch:
- R50: detectron2's `ImageNetPretrained/torchvision/R-50.pkl`, i.e. torchvision's ResNet-50 IMAGENET1K_V1
  (stride in the 3x3 conv, STRIDE_IN_1X1 False), BatchNorm frozen (detectron2's default RESNETS.NORM
  "FrozenBN"), nothing else frozen (BACKBONE.FREEZE_AT 0).
- Swin-T: Microsoft's `swin_tiny_patch4_window7_224` (ImageNet-1k); Swin-L: `swin_large_patch4_window12_384_22k`
  (ImageNet-22k, 384, window 12).

transformers builds Mask2Former's backbone from its config only (random weights), so we load the weights
into `model.model.pixel_level_module.encoder` afterwards:
- Swin: `SwinBackbone.from_pretrained` on Microsoft's transformers conversion of those checkpoints.
- R50: torchvision's tensors from the `timm/resnet50.tv_in1k` repository (torchvision's key names, as
  safetensors), renamed into transformers' ResNetBackbone, then BatchNorm frozen with transformers' own
  FrozenBatchNorm2d (`replace_batch_norm`, torchvision's FrozenBatchNorm2d with eps 1e-5 as detectron2).
  (timm itself cannot be a dependency: it imports torchvision, whose registry wheel is a CUDA build that
  does not import next to the CPU torch the project installs without a GPU.)

`--backbone-weights` takes a hub id, a local folder holding the same files, or `none` (random weights).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from common import SegGenError

# The ImageNet weights Mask2Former's configs start from, by backbone, as hub ids.
DEFAULT_WEIGHTS = {
    "r50": "timm/resnet50.tv_in1k",  # torchvision IMAGENET1K_V1 = detectron2's ImageNetPretrained/torchvision/R-50.pkl
    "swin-t": "microsoft/swin-tiny-patch4-window7-224",  # swin_tiny_patch4_window7_224.pth, ImageNet-1k
    "swin-l": "microsoft/swin-large-patch4-window12-384-in22k",  # swin_large_patch4_window12_384_22k.pth
}
FLAG = "--backbone-weights"


def resolve(spec: str | Path | None, backbone: str) -> str | None:
    """`spec` as given to --backbone-weights -> a folder path or hub id, or None for random weights.
    None / "default" pick DEFAULT_WEIGHTS[backbone]."""
    if spec is None or str(spec) == "default":
        return DEFAULT_WEIGHTS[backbone]
    if str(spec).lower() == "none":
        return None
    return str(spec)


def _offline_error(spec: str, what: str, e: Exception) -> SegGenError:
    first = (str(e).strip().splitlines() or [type(e).__name__])[0]
    return SegGenError(
        f"{FLAG} {spec}: cannot load the {what} weights ({first}). Without internet (HF_HUB_OFFLINE=1) a hub id "
        f"loads only from the cache: download it once on a machine with internet (`hf download {spec}`) and pass "
        f"that folder, or pass `{FLAG} none` for random weights.")


# ---------------------------------------------------------------- ResNet-50 (torchvision names -> transformers)

def torchvision_to_transformers_resnet(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename torchvision ResNet tensors (conv1, bn1, layer{s}.{b}.conv{k}/bn{k}/downsample.{0,1}) into
    transformers' ResNetBackbone names; the classifier (fc) is dropped, num_batches_tracked too."""
    out = {}
    for key, value in state.items():
        if key.startswith("fc.") or key.endswith("num_batches_tracked"):
            continue
        new = re.sub(r"^conv1\.", "embedder.embedder.convolution.", key)
        new = re.sub(r"^bn1\.", "embedder.embedder.normalization.", new)
        m = re.match(r"^layer(\d)\.(\d+)\.(.*)$", new)
        if m:
            stage, block, rest = int(m[1]) - 1, m[2], m[3]
            rest = re.sub(r"^conv(\d)\.", lambda c: f"layer.{int(c[1]) - 1}.convolution.", rest)
            rest = re.sub(r"^bn(\d)\.", lambda c: f"layer.{int(c[1]) - 1}.normalization.", rest)
            rest = re.sub(r"^downsample\.0\.", "shortcut.convolution.", rest)
            rest = re.sub(r"^downsample\.1\.", "shortcut.normalization.", rest)
            new = f"encoder.stages.{stage}.layers.{block}.{rest}"
        out[new] = value
    return out


def _read_state(spec: str, what: str) -> dict[str, torch.Tensor]:
    """The tensors of model.safetensors (or pytorch_model.bin) in a folder or a hub repository."""
    from safetensors.torch import load_file

    folder = Path(spec)
    if folder.is_dir():
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (folder / name).is_file():
                path = folder / name
                break
        else:
            raise SegGenError(f"{FLAG} {spec}: the folder holds no model.safetensors (or pytorch_model.bin)")
    else:
        from huggingface_hub import hf_hub_download

        try:
            path = Path(hf_hub_download(spec, "model.safetensors"))
        except Exception as e:  # offline, unknown repository or file: all name the flag and the fix
            raise _offline_error(spec, what, e) from e
    if path.suffix == ".bin":
        return torch.load(path, map_location="cpu", weights_only=True)
    return load_file(path)


def load_resnet(encoder: torch.nn.Module, spec: str) -> None:
    """torchvision ResNet weights (folder or hub id, torchvision's names) -> a transformers ResNetBackbone."""
    state = torchvision_to_transformers_resnet(_read_state(spec, "ResNet"))
    own = {k: v for k, v in encoder.state_dict().items() if not k.endswith("num_batches_tracked")}
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    wrong = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or wrong:
        bad = (missing or unexpected or wrong)[0]
        raise SegGenError(
            f"{FLAG} {spec}: not torchvision ResNet weights of this architecture ({len(missing)} tensors missing, "
            f"{len(unexpected)} unexpected, {len(wrong)} of another shape; e.g. {bad}). Pass the ResNet-50 folder "
            f"({DEFAULT_WEIGHTS['r50']}) or `{FLAG} none`.")
    encoder.load_state_dict(state, strict=False)  # strict apart from num_batches_tracked, checked above


def freeze_batch_norm(module: torch.nn.Module) -> None:
    """Every BatchNorm2d of `module` -> FrozenBatchNorm2d (statistics and affine as buffers, never
    updated), as detectron2's FrozenBN in Mask2Former's ResNet (transformers' DETR helper)."""
    from transformers.models.detr.modeling_detr import replace_batch_norm

    replace_batch_norm(module)


# ---------------------------------------------------------------- Swin

def load_swin(encoder: torch.nn.Module, spec: str) -> None:
    """Swin weights (hub id or a save_pretrained folder of a SwinModel / SwinForImageClassification) ->
    Mask2Former's SwinBackbone. Only the per-stage output norms, which Mask2Former adds, start fresh."""
    from transformers import SwinBackbone

    try:
        loaded, info = SwinBackbone.from_pretrained(spec, config=encoder.config, output_loading_info=True)
    except (OSError, ValueError) as e:
        raise _offline_error(spec, "Swin", e) from e
    except RuntimeError as e:  # size mismatch: another embed_dim / window size
        raise SegGenError(f"{FLAG} {spec}: these Swin weights do not fit this backbone "
                          f"({str(e).strip().splitlines()[0]}); pass the matching weights or `{FLAG} none`") from e
    missing = [k for k in info["missing_keys"] if not k.startswith("hidden_states_norms.")]
    if missing or info.get("mismatched_keys"):
        bad = (missing or info["mismatched_keys"])[0]
        raise SegGenError(f"{FLAG} {spec}: not Swin weights of this architecture ({len(missing)} tensors missing, "
                          f"{len(info.get('mismatched_keys') or [])} of another shape; e.g. {bad}); pass the matching "
                          f"weights or `{FLAG} none`")
    encoder.load_state_dict(loaded.state_dict())


# ---------------------------------------------------------------- entry point

def init_backbone(model: torch.nn.Module, backbone: str, spec: str | Path | None = None) -> str:
    """Load the ImageNet weights of `backbone` ("r50", "swin-t", "swin-l") into a Mask2Former built from its
    config, and freeze the R50's BatchNorm. `spec`: --backbone-weights (None: the official weights).
    Returns what was loaded, for the log ("random" when none)."""
    encoder = model.model.pixel_level_module.encoder  # ResNetBackbone or SwinBackbone
    source = resolve(spec, backbone)
    if source is not None:
        (load_resnet if backbone == "r50" else load_swin)(encoder, source)
    if backbone == "r50":
        freeze_batch_norm(encoder)  # detectron2 RESNETS.NORM "FrozenBN", also for random weights
    return source or "random"
