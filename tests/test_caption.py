"""caption.py (paper §3.2) with the tiny BLIP-2 on the real sample images."""

import json
import os
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
from conftest import ADE_ROOT, COCO_ROOT, ROOT

from caption import caption, labels_caption
from common.masks.colormap import class_names
from common.data.datasets import load_label, read_dataset
from common.data.manifest import CAPTION_FIELDS, manifest_files, read_manifest


def run_cli(*args, env_extra=None, launcher=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env_extra or {})}
    cmd = (launcher or [sys.executable]) + [str(ROOT / "caption.py"), *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_captions_real_images_into_a_valid_manifest(tiny_models, tmp_path):
    out = tmp_path / "captions" / "ade20k_val.jsonl"
    s = caption("ade20k", ADE_ROOT, "val", out, model=str(tiny_models("blip2")), batch_size=2, num_workers=0,
                max_new_tokens=6)
    assert (s["captioned"], s["skipped"], s["failed"]) == (2, 0, 0)
    records = read_manifest(out, CAPTION_FIELDS, path_fields=("image",))
    assert [r["id"] for r in records] == [x.id for x in read_dataset("ade20k", ADE_ROOT, "val")]
    for r in records:
        assert (ADE_ROOT / r["image"]).is_file()  # relative to the data root
        assert r["caption"] and r["captioner"] == "blip2"
        assert r["prompt"] == "Question: What are shown in the photo? Answer:"


def test_worker_inputs_equal_the_processors_and_give_the_same_captions(tiny_models):
    """The job runs the image processor in its DataLoader workers and tokenises the prompt once: what reaches
    generate must be what BLIP-2's processor makes for the same batch, on the real images (COCO and ADE20K
    sizes differ, so the resize is exercised), and the captions must be the ones the processor's inputs give."""
    import torch
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    from caption import PAPER_PROMPT, ImageFolder, caption_pixels, generation_config, prompt_inputs
    from common.data.datasets import load_image

    model = str(tiny_models("blip2"))
    processor, net = Blip2Processor.from_pretrained(model), Blip2ForConditionalGeneration.from_pretrained(model).eval()
    samples = read_dataset("ade20k", ADE_ROOT, "val") + read_dataset("coco", COCO_ROOT, "val")
    ref = processor(images=[load_image(s.image) for s in samples], text=[PAPER_PROMPT] * len(samples), return_tensors="pt",
                    padding=True)
    folder = ImageFolder(samples, processor.image_processor)
    pixels = torch.stack([folder[i][1] for i in range(len(samples))])
    text = prompt_inputs(processor, PAPER_PROMPT)
    assert torch.equal(pixels, ref["pixel_values"])
    for k in ("input_ids", "attention_mask"):
        assert torch.equal(text[k].expand(len(samples), -1), ref[k])
    gen = generation_config(net, 5, 1)
    with torch.inference_mode():
        ids = net.generate(**ref, generation_config=gen)
    want = [t.strip() for t in processor.batch_decode(ids, skip_special_tokens=True)]
    want = [t[len(PAPER_PROMPT):].strip() if t.startswith(PAPER_PROMPT) else t for t in want]
    assert caption_pixels(net, processor, pixels, text, PAPER_PROMPT, gen, "cpu", torch.float32) == want


def test_stopped_run_resumes_without_duplicates(tiny_models, tmp_path):
    out = tmp_path / "c.jsonl"
    model = str(tiny_models("blip2"))
    first = caption("ade20k", ADE_ROOT, "val", out, model=model, num_workers=0, max_new_tokens=4, limit=1)
    assert first["captioned"] == 1
    with open(out, "a") as f:
        f.write('{"id": "ADE_val_00000002", "ima')  # a line cut short by a kill
    again = caption("ade20k", ADE_ROOT, "val", out, model=model, num_workers=0, max_new_tokens=4)
    assert (again["captioned"], again["skipped"]) == (1, 1)
    ids = [r["id"] for r in read_manifest(out)]
    assert sorted(ids) == ["ADE_val_00000001", "ADE_val_00000002"]
    assert caption("ade20k", ADE_ROOT, "val", out, model=model, num_workers=0)["captioned"] == 0


def test_labels_captioner_lists_classes_by_area():
    (sample,) = read_dataset("ade20k", ADE_ROOT, "train")
    text = labels_caption(sample, "ade20k", class_names("ade20k"))
    # ADE_train_00000001 (an airport hall), checked by hand on the annotation: value 6 (ceiling) covers
    # the most pixels, then 1 (wall), 4 (floor), 42 (column).
    assert text.startswith("ceiling, wall, floor, column, ")
    label = load_label(sample, "ade20k")
    assert len(text.split(", ")) == len(set(np.unique(label)) - {0})
    coco = read_dataset("coco", COCO_ROOT, "val")[0]
    assert labels_caption(coco, "coco", class_names("coco")).startswith("tree, grass, person, sky")


def test_labels_captioner_cli_writes_every_id(tmp_path):
    out = tmp_path / "coco.jsonl"
    run = run_cli("--data", "coco", "--data-root", COCO_ROOT, "--split", "val", "--captioner", "labels", "--out", out)
    assert run.returncode == 0, run.stderr
    recs = read_manifest(out, CAPTION_FIELDS)
    assert [r["id"] for r in recs] == ["000000142238", "000000439180"]
    assert all(r["captioner"] == "labels" and r["model"] is None for r in recs)
    assert "captioned 2, skipped 0" in " ".join(run.stderr.split())


def test_corrupt_image_is_reported_and_others_captioned(tiny_models, tmp_path):
    root = tmp_path / "ade"
    shutil.copytree(ADE_ROOT, root)
    bad = root / "ADEChallengeData2016/images/validation/ADE_val_00000001.jpg"
    bad.chmod(0o644)
    bad.write_bytes(bad.read_bytes()[:1500])  # truncated
    out = tmp_path / "c.jsonl"
    run = run_cli("--data-root", root, "--split", "val", "--model", tiny_models("blip2"), "--out", out,
                  "--max-new-tokens", 4, "--num-workers", 1)
    assert run.returncode == 1, run.stderr
    assert [r["id"] for r in read_manifest(out)] == ["ADE_val_00000002"]
    (err,) = [json.loads(line) for line in (tmp_path / "c.errors.jsonl").read_text().splitlines()]
    assert err["id"] == "ADE_val_00000001" and "unreadable image" in err["error"]
    assert "1 image(s) failed" in " ".join(run.stderr.split())


def test_bad_data_root_fails_before_any_model_is_loaded(tmp_path):
    run = run_cli("--data-root", tmp_path / "nowhere", "--model", tmp_path / "no-model")
    assert run.returncode == 2
    assert "--data-root" in run.stderr and "no ADE20K found" in run.stderr
    run = run_cli("--data", "cityscapes")
    assert run.returncode == 2 and "cityscapes" in run.stderr
    run = run_cli("--data-root", ADE_ROOT, "--split", "val", "--model", tmp_path / "no-model", "--out", tmp_path / "c.jsonl")
    assert run.returncode == 2 and "--model" in run.stderr and "no-model" in run.stderr


@pytest.mark.parametrize("captioner", ["labels", "blip2"])
def test_two_processes_split_the_work_without_overlap(tiny_models, tmp_path, captioner):
    # A real 2-process gloo run on CPU (`accelerate launch --cpu` would run one process).
    with socket.socket() as sock:  # a free port for the rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port)]
    out = tmp_path / "c.jsonl"
    one = tmp_path / "one.jsonl"
    args = ["--data-root", ADE_ROOT, "--split", "val", "--captioner", captioner, "--model", tiny_models("blip2"),
            "--max-new-tokens", 4, "--num-workers", 0]
    run = run_cli(*args, "--out", out, launcher=launcher, env_extra={"ACCELERATE_USE_CPU": "true"})
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in manifest_files(out)) == ["c.shard0-of-2.jsonl", "c.shard1-of-2.jsonl"]
    per_rank = [{r["id"] for r in read_manifest(p)} for p in manifest_files(out)]
    assert per_rank[0] and per_rank[1] and not per_rank[0] & per_rank[1]
    assert run_cli(*args, "--out", one).returncode == 0
    two = {r["id"]: r["caption"] for r in read_manifest(out)}
    assert two == {r["id"]: r["caption"] for r in read_manifest(one)}  # same ids, same captions
