"""Weights load as safetensors only (issue 16 item 4). A pickle (`*.bin`, torch.save) runs code when it is
loaded, so every from_pretrained of ours passes `use_safetensors=True`, and a local model folder that holds
pickle weights only is refused before any model loads, with a message saying how to convert it:

    check_safetensors(folder, "--pretrained")  # SegGenError if folder (or a component of it) is *.bin only

A hub id is not looked at here: `use_safetensors=True` makes diffusers / transformers refuse a pickle-only
repo, and our loaders turn that error into a message naming the flag.
"""

from __future__ import annotations

import json
from pathlib import Path

from common import SegGenError

SAFE = {"use_safetensors": True}  # spread into every from_pretrained: from_pretrained(path, **SAFE)
PICKLES = ("diffusion_pytorch_model*.bin", "pytorch_model*.bin")  # diffusers' and transformers' pickle weight names


def _components(folder: Path) -> list[Path]:
    """The folders that hold weights: a pipeline's components (model_index.json), else the folder itself."""
    index = folder / "model_index.json"
    if index.is_file():
        try:
            parts = json.loads(index.read_text())
        except ValueError:
            return [folder]  # the callers' own checks name a broken model_index.json
        return [folder / k for k, v in parts.items() if isinstance(v, list) and v and v[0] and (folder / k).is_dir()]
    return [folder]


def pickle_only(folder: str | Path) -> list[Path]:
    """The component folders of `folder` whose weights are pickles with no safetensors beside them."""
    return [d for d in _components(Path(folder))
            if any(p for pat in PICKLES for p in d.glob(pat)) and not any(d.glob("*.safetensors"))]


def check_safetensors(folder: str | Path, flag: str) -> None:
    """SegGenError naming `flag` if the local model folder `folder` (or a component of it) has pickle weights only."""
    if not Path(folder).is_dir():
        return
    bad = pickle_only(folder)
    if bad:
        names = ", ".join(sorted({p.name for d in bad for pat in PICKLES for p in d.glob(pat)}))
        raise SegGenError(
            f"{flag} {folder}: {', '.join(str(d) for d in bad)} hold(s) pickle weights only ({names}), and SegGen "
            f"loads safetensors only (use_safetensors=True: a pickle can run code when loaded). Convert it once, in a "
            f"session you trust: load it with from_pretrained(FOLDER, use_safetensors=False) and write it back with "
            f"save_pretrained(FOLDER, safe_serialization=True)")
