"""Shared fixtures: the real sample data shipped in tests/data, and tiny models built once per session."""

import os
import sys
from pathlib import Path

# Offline and quiet before anything imports transformers / diffusers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# One torch thread in every stage a test runs in-process (threads.configure() in common/runtime/threads.py reads it): the tiny
# models gain nothing from a second, and results stay the same as in subprocesses run with OMP_NUM_THREADS=1.
os.environ.setdefault("SEGGEN_THREADS", "1")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pytest  # noqa: E402

DATA = ROOT / "tests" / "data"
ADE_ROOT = DATA / "ade20k"  # parent of ADEChallengeData2016
COCO_ROOT = DATA / "coco"

# Captions of the two ADE20K val samples, for the generator trainers' tests.
TRAIN_CAPTIONS = {"ADE_val_00000001": "a living room with a sofa and a lamp",
                  "ADE_val_00000002": "a street with cars, trees and sky"}


def write_captions(path, captions=TRAIN_CAPTIONS):
    """A captions manifest as caption.py writes it (image relative to the data root)."""
    import json

    with open(path, "w") as f:
        for i, c in captions.items():
            f.write(json.dumps({"id": i, "image": f"ADEChallengeData2016/images/validation/{i}.jpg", "caption": c}) + "\n")
    return path


def trainer_args(tmp_path, pretrained, out, **extra):
    """Command line of a tiny, fast train_text2mask.py / train_mask2img.py run on the ADE20K val samples;
    an extra flag given as None is a bare switch."""
    args = {"--data-root": ADE_ROOT, "--split": "val", "--captions": write_captions(tmp_path / "captions.jsonl"),
            "--pretrained": pretrained, "--output-dir": out, "--resolution": 64, "--global-batch-size": 2, "--batch-size": 2, "--num-workers": 0,
            "--validation-steps": 0, "--checkpointing-steps": 0, "--report-to": "none", **extra}
    return [str(x) for kv in args.items() for x in kv if x is not None]


def invoke(app, args):
    """Run a Typer app in-process; a crash (not an exit) is raised with its traceback."""
    from typer.testing import CliRunner

    result = CliRunner().invoke(app, args)
    if isinstance(result.exception, Exception) and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


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
    from common.models import tiny

    built = {}

    def get(kind):
        if kind not in built:
            out = tmp_path_factory.mktemp(f"tiny-{kind}")
            base = get("sdxl") if kind == "controlnet" else None
            built[kind] = tiny.save(kind, out, base)
        return built[kind]

    return get
