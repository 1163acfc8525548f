"""common/runtime/quiet.py: the library chatter a run expects is gone, our one line appears, other warnings stay.

The chatter is produced in a fresh process (transformers warns some messages only once per process, and
OpenMP / logging state is global), once without and once with quiet(); stderr is compared.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common.runtime import quiet as q

ROOT = Path(__file__).resolve().parents[1]
LONG = "a living room with a sofa, a lamp, a table, two chairs, a window, curtains, a rug and a painting on the wall"

SCRIPT = r"""
import os, sys, logging, warnings
if sys.argv[1] == "quiet":
    from common.runtime.quiet import quiet
    quiet()
import torch
import bitsandbytes  # on CPUs with AVX512-BF16 it warns about the optional `kernels` package while importing
from diffusers import StableDiffusionXLPipeline  # imports CLIP/Siglip image processors: the torchvision fallback
from transformers import Mask2FormerForUniversalSegmentation
pipe = StableDiffusionXLPipeline.from_pretrained(sys.argv[2])
pipe.unet.to("cpu", dtype=torch.float32)  # as the trainers place the frozen UNet: "should be kept in float32: []"
pipe.encode_prompt(sys.argv[4], device="cpu", do_classifier_free_guidance=False)  # longer than 77 tokens
Mask2FormerForUniversalSegmentation.from_pretrained(sys.argv[3], num_labels=133, ignore_mismatched_sizes=True)
list(torch.utils.data.DataLoader(list(range(4)), num_workers=len(os.sched_getaffinity(0)) + 1))
logging.getLogger("transformers.modeling_utils").warning("SOMETHING UNEXPECTED")  # must still show
from common.runtime.quiet import caption_cut_note
print(caption_cut_note(pipe.tokenizer, {"ADE_train_1": "a room", "ADE_train_2": sys.argv[4]}, source="captions.jsonl"),
      file=sys.stderr)
"""


def chatter(tiny_models, tmp_path, mode):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for k in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):  # as a user's shell has them: unset
        env.pop(k, None)
    script = tmp_path / "chatter.py"
    script.write_text(SCRIPT)
    out = subprocess.run([sys.executable, str(script), mode, str(tiny_models("sdxl")), str(tiny_models("mask2former")),
                          LONG * 2], env=env, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert out.returncode == 0, out.stderr
    return out.stderr


def test_quiet_drops_the_expected_library_messages_and_keeps_ours_and_the_unexpected(tiny_models, tmp_path):
    loud, calm = chatter(tiny_models, tmp_path, "loud"), chatter(tiny_models, tmp_path, "quiet")
    expected = ["truncated because CLIP can only handle", "Token indices sequence length is longer",
                "LOAD REPORT", "This DataLoader will create", "Loading pipeline components",
                "that should be kept in float32: []"]
    if importlib.util.find_spec("torchvision") is None:
        expected.append("requires torchvision (not installed); falling back to")
    if "Failed to load CPU gemm_4bit_forward" in loud:  # only on CPUs with AVX512-BF16
        expected.append("Failed to load CPU gemm_4bit_forward")
    for text in expected:
        assert text in loud, f"the library no longer says {text!r}: update common/runtime/quiet.py"
        assert text not in calm, f"quiet() let through {text!r}:\n{calm}"
    for out in (loud, calm):
        assert "SOMETHING UNEXPECTED" in out
        assert "captions.jsonl: 1 of 2 captions are longer than the text encoder's 77 tokens" in out
    assert calm.count("captions.jsonl:") == 1


REPORT = """\x1b[1mMask2FormerForUniversalSegmentation LOAD REPORT\x1b[0m from: /m2f
Key                    | Status   |
-----------------------+----------+------------------------------
criterion.empty_weight | MISMATCH | Reinit due to size mismatch - ckpt: torch.Size([151]) vs model:torch.Size([134])
class_predictor.bias   | MISMATCH | Reinit due to size mismatch - ckpt: torch.Size([151]) vs model:torch.Size([134])
{extra}
Notes:
- MISMATCH:\tckpt weights were loaded, but they did not match the original empty weight shapes."""


def test_a_load_report_is_dropped_only_when_the_class_head_alone_is_reinitialised():
    assert q.head_only_load_report(REPORT.format(extra=""))
    missing = "pixel_level_module.encoder.embeddings.patch_embeddings.projection.weight | MISSING |"
    assert not q.head_only_load_report(REPORT.format(extra=missing))  # a wrong checkpoint still shows its table
    mismatch = "transformer_module.queries_features.weight | MISMATCH | Reinit due to size mismatch"
    assert not q.head_only_load_report(REPORT.format(extra=mismatch))
    assert not q.head_only_load_report("some other warning")


def test_caption_cut_note_names_the_cut_captions_once(tiny_models):
    from transformers import CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_models("sdxl"), subfolder="tokenizer")
    assert q.caption_cut_note(tok, {"a": "a room", "b": "a street"}) is None
    note = q.caption_cut_note(tok, {"a": "a room", "b": LONG, "c": LONG * 2}, source="captions/ade20k_train.jsonl")
    n = len(tok(LONG).input_ids)  # start + about one token per character (the tiny BPE has 4 merges) + end
    assert n > 77
    assert note.startswith("captions/ade20k_train.jsonl: 2 of 3 captions are longer than the text encoder's 77 tokens")
    assert f"first: b ({n} tokens)" in note
    kept = tok.decode(tok(LONG, truncation=True, max_length=77).input_ids, skip_special_tokens=True)
    assert note.endswith(f"cut after '… {' '.join(kept.split()[-4:])}'")
    assert "\n" not in note


@pytest.mark.parametrize("text", ["requires torchvision (not installed); falling back to `CLIPImageProcessorPil`",
                                  "The following part of your input was truncated because CLIP can only handle"])
def test_the_filter_drops_expected_messages_by_text(text):
    import logging

    keep = q.ExpectedMessages("transformers").filter(logging.makeLogRecord({"msg": "A real problem"}))
    assert keep
    library = "diffusers" if "CLIP can only" in text else "transformers"
    assert not q.ExpectedMessages(library).filter(logging.makeLogRecord({"msg": f"`X` {text}"}))


# ---------------------------------------------------------------- the stages call quiet() and threads.configure()
CHATTER = ["falling back to", "LOAD REPORT", "Token indices sequence length", "worker processes",
           "truncated because CLIP can only handle"]


def stage_stderr(args, tmp_path):
    """A stage script run as a user runs it (a fresh process, no verbosity variables): its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    for k in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
        env.pop(k, None)
    out = subprocess.run([sys.executable, *map(str, args)], env=env, capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stderr


@pytest.mark.parametrize("stage", ["train_text2mask", "imgsyn"])
def test_a_stage_run_shows_our_caption_note_and_no_library_chatter(stage, tiny_models, tmp_path):
    from conftest import ADE_ROOT, TRAIN_CAPTIONS, trainer_args, write_captions

    long = {"ADE_val_00000001": LONG * 2, "ADE_val_00000002": TRAIN_CAPTIONS["ADE_val_00000002"]}
    if stage == "train_text2mask":
        args = trainer_args(tmp_path, tiny_models("sdxl"), tmp_path / "run", **{"--max-steps": 1})
        write_captions(tmp_path / "captions.jsonl", long)
    else:
        captions = write_captions(tmp_path / "captions.jsonl", long)
        args = ["--data-root", ADE_ROOT, "--split", "val", "--captions", captions, "--mask2img", tiny_models("controlnet"),
                "--base", tiny_models("sdxl"), "--per-sample", 1, "--steps", 1, "--resolution", 64, "--out", tmp_path / "o"]
    err = stage_stderr([ROOT / f"{stage}.py", *args], tmp_path)
    for text in CHATTER:
        assert text not in err, f"{stage}.py let through {text!r}:\n{err}"
    assert err.count("1 of 2 captions are longer than the text encoder's 77 tokens") == 1, err
    assert "first: ADE_val_00000001" in err
