"""Shared fixtures: the real sample data shipped in tests/data, and tiny models built once per session."""

import os
import sys
from pathlib import Path

# Offline and quiet before anything imports transformers / diffusers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

DATA = ROOT / "tests" / "data"
ADE_ROOT = DATA / "ade20k"  # parent of ADEChallengeData2016
COCO_ROOT = DATA / "coco"


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """One torch thread: the tiny models' ops are so small that a second thread only adds contention."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Build a tiny model of each kind on first use: tiny_models("sdxl") -> its folder."""
    from common import tiny

    built = {}

    def get(kind):
        if kind not in built:
            out = tmp_path_factory.mktemp(f"tiny-{kind}")
            base = get("sdxl") if kind == "controlnet" else None
            built[kind] = tiny.save(kind, out, base)
        return built[kind]

    return get
