"""SDXL's conditioning, and telling SDXL from SD-1.5 (paper appendix A.4, A.11), for the two generator
trainers and for sampling (common/synthesis/synth.py).

- the base pipeline: SDXL or SD-1.5, told apart from its model_index.json (`is_sdxl`), never by a flag;
  `inspect_base` reads what the trainers need before loading any weights;
- SDXL's size/crop micro-conditioning (`time_ids`, Podell et al. 2023 §2.2);
- prompt encoding the SDXL way (`encode_prompts`) and a cache of every caption's embeddings on disk, so
  the two large text encoders run once and are freed before training (`cache_text_embeddings`, and with
  the held-out validation captions `cache_caption_sets`);
- caption dropout that zeroes the embeddings the way SDXL's classifier-free guidance does
  (`drop_captions`), and the validation prompts' unconditional branch (`validation_prompts`).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from common import SegGenError
from common.runtime.weights import SAFE, check_safetensors

PAPER_BASE = "stabilityai/stable-diffusion-xl-base-1.0"  # appendix A.4: both generators start from SDXL-base


@dataclass(frozen=True)
class BaseInfo:
    """What the trainers need to know about --pretrained before loading any weights."""

    path: str  # as given: a folder or a hub id
    is_sdxl: bool  # two text encoders, pooled embedding, add_time_ids (else SD-1.5-style, appendix A.11)
    vae_factor: int  # how much the VAE downsamples: a resolution must be a multiple of it
    force_zeros_for_empty_prompt: bool  # SDXL's unconditional embedding is all zeros, not encode("")


def _base_file(pretrained: str, name: str, flag: str = "--pretrained") -> dict:
    """A JSON file of the base pipeline (or of the --vae), from its folder or (for a hub id) the hub cache."""
    folder = Path(pretrained)
    what = "a diffusers pipeline folder" if flag == "--pretrained" else "an AutoencoderKL folder"
    if folder.exists():
        path = folder / name
        if not path.is_file():
            raise SegGenError(
                f"{flag} {pretrained}: {name} is missing; pass {what} (as written by save_pretrained, "
                f"e.g. `python -m common.models.tiny sdxl DIR`) or a hub id such as {PAPER_BASE}"
            )
    else:
        try:
            from huggingface_hub import hf_hub_download

            sub, _, file = name.rpartition("/")
            path = Path(hf_hub_download(pretrained, file, subfolder=sub or None))
        except Exception as e:  # noqa: BLE001 - offline, unknown repo, bad id: all mean the same to the user
            raise SegGenError(
                f"{flag} {pretrained}: no such folder, and not a hub id that can be read here "
                f"({type(e).__name__}). Pass {what} (e.g. `python -m common.models.tiny sdxl DIR`) "
                f"or a hub id such as {PAPER_BASE} on a machine that can download it"
            ) from None
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SegGenError(f"--pretrained {pretrained}: {name} is not valid JSON ({e})") from e


def is_sdxl(index: dict) -> bool:
    """SDXL or SD-1.5, from a pipeline's model_index.json: SDXL has a second text encoder (and tokenizer)."""
    return isinstance(index.get("text_encoder_2"), list) and index["text_encoder_2"][0] is not None


def inspect_base(pretrained: str) -> BaseInfo:
    """SDXL or SD-1.5, from model_index.json (a text_encoder_2 entry means SDXL), and the VAE's factor."""
    index = _base_file(pretrained, "model_index.json")
    for part in ("unet", "vae", "scheduler", "text_encoder", "tokenizer"):
        if not (isinstance(index.get(part), list) and index[part][0]):
            raise SegGenError(f"--pretrained {pretrained}: model_index.json has no {part!r}; a Stable Diffusion (XL) pipeline is needed")
    sdxl = is_sdxl(index)
    vae = _base_file(pretrained, "vae/config.json")
    check_safetensors(pretrained, "--pretrained")  # pickle-only weights are refused before any model loads
    factor = 2 ** (len(vae.get("block_out_channels", [0] * 4)) - 1)
    return BaseInfo(pretrained, sdxl, factor, bool(index.get("force_zeros_for_empty_prompt", sdxl)))


def check_vae(vae: str | None) -> None:
    """--vae: an AutoencoderKL folder or hub id (e.g. madebyollin/sdxl-vae-fp16-fix), checked before loading."""
    if vae is not None:
        config = _base_file(vae, "config.json", "--vae")
        if config.get("_class_name") != "AutoencoderKL":
            raise SegGenError(f"--vae {vae}: config.json describes a {config.get('_class_name')}, not an AutoencoderKL")
        check_safetensors(vae, "--vae")


def check_resolution(resolution: int, base: BaseInfo) -> None:
    if resolution % base.vae_factor:
        lo = resolution // base.vae_factor * base.vae_factor
        raise SegGenError(
            f"--resolution {resolution} is not a multiple of {base.vae_factor} (the VAE of {base.path} downsamples by "
            f"{base.vae_factor}): use {max(lo, base.vae_factor)} or {lo + base.vae_factor}"
        )


def time_ids(original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int],
             dtype=torch.float32) -> torch.Tensor:
    """SDXL's micro-conditioning (Podell et al. 2023, §2.2): (6,) = original (h, w) + crop (top, left) + target (h, w)."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=dtype)


def load_text_encoders(pretrained: str, is_sdxl: bool, device, dtype) -> list[tuple]:
    """[(tokenizer, text encoder)]: one pair for SD-1.5, two for SDXL (CLIP ViT-L, then OpenCLIP bigG with projection)."""
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    pairs = [(AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer"),
              CLIPTextModel.from_pretrained(pretrained, subfolder="text_encoder", torch_dtype=dtype, **SAFE))]
    if is_sdxl:
        pairs.append((AutoTokenizer.from_pretrained(pretrained, subfolder="tokenizer_2"),
                      CLIPTextModelWithProjection.from_pretrained(pretrained, subfolder="text_encoder_2", torch_dtype=dtype, **SAFE)))
    return [(tok, enc.to(device).eval().requires_grad_(False)) for tok, enc in pairs]


@torch.no_grad()
def encode_prompts(prompts: list[str], encoders: list[tuple]) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Text embeddings as the pipelines compute them.

    SDXL: each encoder's penultimate hidden states, concatenated on the channel axis -> (B, 77, 768+1280),
    and the second encoder's pooled projection -> (B, 1280). SD-1.5: the last hidden states, no pooled.
    """
    is_sdxl = len(encoders) == 2
    hidden, pooled = [], None
    for tok, enc in encoders:
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt").input_ids
        out = enc(ids.to(enc.device), output_hidden_states=True)
        hidden.append(out.hidden_states[-2] if is_sdxl else out.last_hidden_state)
        if is_sdxl:
            pooled = out[0]  # text_embeds of the projection model (the last encoder in the loop)
    return torch.cat(hidden, -1), pooled


class TextEmbeddings:
    """Row i = the cached embeddings of training sample i; row N = the empty prompt. Memory-mapped .npy
    files, so every process and data-loader worker shares one copy in the page cache (ADE20K at SDXL
    size: 20k × 77 × 2048 fp16 = 6.4 GB on disk, only touched rows in memory)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self._embeds = self._pooled = None

    def _open(self):
        if self._embeds is None:
            self._embeds = np.load(self.folder / "embeds.npy", mmap_mode="r")
            pooled = self.folder / "pooled.npy"
            self._pooled = np.load(pooled, mmap_mode="r") if pooled.is_file() else None

    def __getstate__(self):  # data-loader workers reopen the maps instead of pickling them
        return {"folder": self.folder, "_embeds": None, "_pooled": None}

    def row(self, i: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._open()
        e = torch.from_numpy(np.array(self._embeds[i]))
        return e, (torch.from_numpy(np.array(self._pooled[i])) if self._pooled is not None else None)

    def empty(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._open()
        return self.row(len(self._embeds) - 1)


def cache_text_embeddings(pretrained: str, base: BaseInfo, captions: list[str], folder: Path, accelerator,
                          batch_size: int = 64, dtype=torch.float32, console=None) -> TextEmbeddings:
    """Encode every caption once (plus the empty prompt) into folder/{embeds,pooled}.npy, fp16 (see
    cache_caption_sets)."""
    return cache_caption_sets(pretrained, base, [(captions, folder)], accelerator, batch_size, dtype, console)[0]


def cache_caption_sets(pretrained: str, base: BaseInfo, sets: list[tuple[list[str], Path]], accelerator,
                       batch_size: int = 64, dtype=torch.float32, console=None) -> list[TextEmbeddings]:
    """Encode each set of captions once (plus the empty prompt) into its folder/{embeds,pooled}.npy, fp16:
    the training captions and the held-out validation ones (common/diffusion/validation.py), so the text
    encoders load once and are freed before the UNet arrives. They run in `dtype` on a GPU, fp32 elsewhere.

    The main process encodes; the others wait and then map the files. A fingerprint of the base and the
    captions is kept beside each set, so a resumed run reuses the caches and a changed captions file
    rebuilds only its own."""
    if accelerator.device.type != "cuda":
        dtype = torch.float32  # CPUs lack fast fp16 kernels
    stale = [(captions, Path(folder)) for captions, folder in sets if not _fresh(pretrained, base, captions, Path(folder))]
    if accelerator.is_main_process and stale:
        t = time.perf_counter()
        encoders = load_text_encoders(pretrained, base.is_sdxl, accelerator.device, dtype)
        for captions, folder in stale:
            _encode_into(folder, captions, encoders, batch_size)
            meta = {"fingerprint": _fingerprint(pretrained, base, captions), "rows": len(captions) + 1, "base": pretrained}
            (folder / "meta.json").write_text(json.dumps(meta) + "\n")
        del encoders  # the text encoders are not needed again: free them before the UNet arrives
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if console is not None:
            done = " and ".join(f"{len(c)} captions -> {f}" for c, f in stale)
            console.print(f"text embeddings: encoded once in {time.perf_counter() - t:.1f} s: {done}")
    accelerator.wait_for_everyone()
    return [TextEmbeddings(folder) for _, folder in sets]


def _fingerprint(pretrained: str, base: BaseInfo, captions: list[str]) -> str:
    return hashlib.sha256(json.dumps([pretrained, base.is_sdxl, captions]).encode()).hexdigest()


def _fresh(pretrained: str, base: BaseInfo, captions: list[str], folder: Path) -> bool:
    meta = folder / "meta.json"
    return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == _fingerprint(pretrained, base, captions)


def _encode_into(folder: Path, captions: list[str], encoders, batch_size: int) -> None:
    """Rows 0..N-1: the captions, row N: the empty prompt, written in place on disk."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # a kill while writing leaves the set stale, not half-valid
    prompts = captions + [""]
    embeds = pooled = None
    for start in range(0, len(prompts), batch_size):
        e, p = encode_prompts(prompts[start:start + batch_size], encoders)
        if embeds is None:  # (N+1, 77, D) and (N+1, P)
            embeds = np.lib.format.open_memmap(folder / "embeds.npy", "w+", np.float16, (len(prompts), *e.shape[1:]))
            if p is not None:
                pooled = np.lib.format.open_memmap(folder / "pooled.npy", "w+", np.float16, (len(prompts), p.shape[1]))
        embeds[start:start + len(e)] = e.float().cpu().numpy()
        if pooled is not None:
            pooled[start:start + len(p)] = p.float().cpu().numpy()
    embeds.flush()
    if pooled is not None:
        pooled.flush()


def drop_captions(embeds: torch.Tensor, pooled: torch.Tensor | None, p: float, generator: torch.Generator,
                  empty: tuple[torch.Tensor, torch.Tensor | None], zeros: bool):
    """Caption dropout for classifier-free guidance: each sample loses its caption with probability p.

    SDXL (force_zeros_for_empty_prompt) samples its unconditional branch with all-zero embeddings, so a
    dropped caption becomes zeros, pooled included; SD-1.5 uses the embedding of the empty prompt."""
    if p <= 0:
        return embeds, pooled
    drop = torch.rand(embeds.shape[0], generator=generator, device=generator.device) < p  # (B,)
    e_empty, p_empty = (torch.zeros_like(embeds[0]), None if pooled is None else torch.zeros_like(pooled[0])) if zeros else empty
    embeds = torch.where(drop[:, None, None], e_empty.to(embeds), embeds)
    if pooled is not None:
        pooled = torch.where(drop[:, None], p_empty.to(pooled), pooled)
    return embeds, pooled


def validation_prompts(items: list[dict], base: BaseInfo, empty, device, dtype) -> dict:
    """Pipeline keyword arguments from the items' cached embeddings, with the unconditional branch as
    the base samples it: zeros for SDXL (force_zeros_for_empty_prompt), else the empty prompt's."""
    embeds = torch.stack([it["prompt_embeds"] for it in items]).to(device, dtype)  # (B, 77, D)
    zeros = base.force_zeros_for_empty_prompt
    kw = dict(prompt_embeds=embeds,
              negative_prompt_embeds=torch.zeros_like(embeds) if zeros else empty[0][None].expand_as(embeds).to(device, dtype))
    if base.is_sdxl:
        pooled = torch.stack([it["pooled_prompt_embeds"] for it in items]).to(device, dtype)  # (B, P)
        kw.update(pooled_prompt_embeds=pooled,
                  negative_pooled_prompt_embeds=torch.zeros_like(pooled) if zeros else empty[1][None].expand_as(pooled).to(device, dtype))
    return kw

