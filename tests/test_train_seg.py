"""train_seg.py with the tiny Mask2Former on the real ADE20K samples: it learns, p_aug draws at its rate
from the given folders only, pretrain runs both phases, evaluation at the original resolution, bad inputs."""

import json
import re
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import ADE_ROOT
from PIL import Image
from scipy.stats import binomtest
from typer.testing import CliRunner

import train_seg
from common.seg import data as segdata
from common.seg import hrnet
from common.seg import evaluate as segeval
from common.seg import inference as seginfer
from common.seg import model as segmodel
from common.data.datasets import load_label, load_panoptic, read_dataset
from common.runtime.loader import as_tensors
from common.data.manifest import ManifestWriter

runner = CliRunner()
FAST = ["--model", None, "--batch-size", "2", "--crop", "64", "--num-workers", "0", "--checkpoint-every", "0", "--log-every", "2"]


def _cli(args, tiny=None):
    args = [str(a) for a in args]
    if tiny is not None:
        args = [str(tiny) if a == "None" else a for a in args]
    return runner.invoke(train_seg.app, args)


def _ok(result):
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


@pytest.fixture(scope="module")
def tiny(tiny_models):
    return tiny_models("mask2former")


@pytest.fixture(scope="module")
def ade_all(tmp_path_factory):
    """A data root whose training and validation splits both hold all 3 real ADE20K pairs."""
    root = tmp_path_factory.mktemp("ade") / "ADEChallengeData2016"
    src = ADE_ROOT / "ADEChallengeData2016"
    for split in ("training", "validation"):
        for kind, ext in (("images", "jpg"), ("annotations", "png")):
            (root / kind / split).mkdir(parents=True)
            for f in src.glob(f"{kind}/*/*.{ext}"):
                shutil.copy(f, root / kind / split / f.name)
    return root


def _write_synthetic(folder, samples, n=2, label=None, settings=None):
    """A synthetic folder made by hand: copies of real samples under new ids (tests/test_datasets.py's
    record fields); `label` replaces every annotation (e.g. all zeros = all ignore)."""
    for sub in ("images", "annotations", "colormaps"):
        (folder / sub).mkdir(parents=True)
    with ManifestWriter(folder / "manifest.jsonl", path_fields=("image", "annotation", "colormap")) as w:
        for sample in samples:
            for k in range(n):
                sid = f"{folder.name}_{sample.id}_s{k}"
                shutil.copy(sample.image, folder / f"images/{sid}.jpg")
                if label is None:
                    shutil.copy(sample.annotation, folder / f"annotations/{sid}.png")
                else:
                    Image.fromarray(label(load_label(sample, "ade20k"))).save(folder / f"annotations/{sid}.png")
                shutil.copy(sample.annotation, folder / f"colormaps/{sid}.png")
                w.append({"id": sid, "source_id": sample.id, "method": "imgsyn", "image": f"images/{sid}.jpg",
                          "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png",
                          "caption": "a room", "seed": k, "k": k, "models": {}, **({"settings": settings} if settings else {})})
    return folder


def _stats(run):
    return [json.loads(line) for line in (run / "stats.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------- it learns; evaluation at full resolution

def test_tiny_mask2former_overfits_real_ade20k_samples(tiny, ade_all, tmp_path):
    before = _ok(_cli(["--eval-only", "--checkpoint", tiny, "--data-root", ade_all, "--eval-size", "64",
                       "--metrics-file", tmp_path / "before.json", "--output-dir", tmp_path / "eval"]))
    start = json.loads((tmp_path / "before.json").read_text())["single_scale"]
    _ok(_cli(["--data-root", ade_all, "--strategy", "real", "--max-steps", "40", "--lr", "2e-3", "--grad-clip", "0",
              "--output-dir", tmp_path / "run", *FAST], tiny))
    end = json.loads((tmp_path / "run/metrics.json").read_text())["single_scale"]
    card = (tmp_path / "run/model/README.md").read_text()  # the model card beside the weights, with the metrics
    assert card.startswith("---\n") and "mIoU" in card and "arXiv:2311.03355" in card
    losses = [r["loss"] for r in _stats(tmp_path / "run")]
    # Measured on these samples (seed 0, 2 cores): start mIoU 0.00006 / pixel accuracy 0.0012; after 40
    # steps at lr 2e-3 mIoU 0.027 / pixel accuracy 0.30 (lr 3e-3: 0.017 / 0.27). Thresholds with margin:
    assert start["mIoU"] < 0.005 and start["pixel_accuracy"] < 0.05, start
    assert end["mIoU"] > 0.01 and end["mIoU"] > 10 * start["mIoU"], (start["mIoU"], end["mIoU"])
    assert end["pixel_accuracy"] > 0.15, end["pixel_accuracy"]
    assert losses[-1] < losses[0]
    assert "mIoU" in before.output  # the rich table


def test_semantic_inference_leaves_out_the_no_object_class():
    # Mask2Former: softmax over C + 1 classes, the last ("no object") dropped, times sigmoid masks.
    classes = torch.tensor([[0.1, 0.7, 0.2], [0.0, 0.0, 1.0]])  # (Q=2, C+1=3): query 1 is "no object"
    masks = torch.tensor([[[9.0, -9.0]], [[9.0, 9.0]]])  # (Q, 1, 2)
    scores = seginfer.semantic_inference(classes, masks)
    assert scores.shape == (2, 1, 2)
    on, off = torch.sigmoid(torch.tensor(9.0)).item(), torch.sigmoid(torch.tensor(-9.0)).item()
    assert scores[:, 0, 0].tolist() == pytest.approx([0.1 * on, 0.7 * on])  # the no-object query adds nothing
    assert scores[:, 0, 1].tolist() == pytest.approx([0.1 * off, 0.7 * off])


def test_evaluation_at_original_resolution_of_non_square_images(tiny, tmp_path):
    val = read_dataset("ade20k", ADE_ROOT, "val")
    _ok(_cli(["--eval-only", "--checkpoint", tiny, "--data-root", ADE_ROOT, "--eval-size", "64", "--output-dir", tmp_path]))
    got = json.loads((tmp_path / "metrics.json").read_text())["single_scale"]
    labels = [load_label(s, "ade20k") for s in val]
    assert any(lab.shape[0] != lab.shape[1] for lab in labels)
    # Every labelled pixel of the original-size annotations was scored (class 0 = ignored).
    assert got["pixels"] == sum(int((lab > 0).sum()) for lab in labels)
    net, processor = segmodel.build_model(str(tiny), None, "ade20k")
    image = torch.rand(3, 77, 130)
    assert seginfer.semantic_scores(net.eval(), image, 64).shape == (150, 77, 130)
    assert seginfer.semantic_scores(net, image, 64, flip=True).shape == (150, 77, 130)


def test_multiscale_views_follow_mask2formers_test_aug(tiny, tmp_path, monkeypatch):
    # TEST.AUG at MIN_SIZE_TEST 512: MIN_SIZES [256, 384, 512, 640, 768, 896], MAX_SIZE 3584, FLIP: here
    # at --eval-size 64, short sides 32..112 in steps of 16, flipped and not, long side at most 448.
    views = []
    predict = seginfer.predict
    seen = lambda m, x, short, long, flip=False: views.append((short, long, flip)) or predict(m, x, short, long, flip)  # noqa: E731
    monkeypatch.setattr(segeval, "predict", seen)  # the single-scale view (panoptic/instance path) ...
    monkeypatch.setattr(seginfer, "predict", seen)  # ... and every view semantic_scores takes
    _ok(_cli(["--eval-only", "--checkpoint", tiny, "--data-root", ADE_ROOT, "--eval-size", "64", "--multiscale",
              "--output-dir", tmp_path]))
    multi = views[len(views) // 13:]  # 2 images: 1 single-scale view each, then 12 multi-scale views each
    assert sorted(set(multi)) == [(s, 448, f) for s in range(32, 113, 16) for f in (False, True)]
    assert set(views[:len(views) // 13]) == {(64, 256, False)}


def test_augmentation_keeps_labels_exact_and_crops_to_size():
    (train,) = read_dataset("ade20k", ADE_ROOT, "train")
    values = set((segdata.load_target(train, "ade20k", "semantic")).flatten().tolist())
    data = segdata.SegData([[train]], "ade20k", 96)
    for seed in range(12):
        item = data[(0, 0, seed)]
        assert item["image"].shape == (3, 96, 96) and item["image"].dtype == torch.uint8
        lab = item["label"].numpy()
        assert set(np.unique(lab).tolist()) <= values | {-1}  # NEAREST only: no invented classes
        assert (lab[~item["valid"].numpy()] == -1).all()  # padding is ignored
        assert (lab >= 0).any()  # a crop with labels was found
    assert np.array_equal(data[(0, 0, 5)]["label"], data[(0, 0, 5)]["label"])  # the seed fixes it
    plain = segdata.SegData([[train]], "ade20k", 96, augment=False)
    assert np.array_equal(plain[(0, 0, 1)]["image"], plain[(0, 0, 2)]["image"])  # --no-augment: fixed


def test_ade20k_resize_draws_the_short_side_from_mask2formers_16_sizes():
    # Mask2Former's ADE20K config: MIN_SIZE_TRAIN [int(x * 0.1 * 512) for x in range(5, 21)], "choice".
    allowed = {int(x * 0.1 * 512) for x in range(5, 21)}
    image, label = Image.new("RGB", (300, 200)), np.zeros((200, 300), np.uint8)
    rng = np.random.default_rng(0)
    shorts = [min(segdata.random_resize(image, label, 512, rng)[0].size) for _ in range(300)]
    assert set(shorts) == allowed
    wide = Image.new("RGB", (900, 100))  # the long side stays within MAX_SIZE_TRAIN 2048
    assert max(max(segdata.random_resize(wide, np.zeros((100, 900), np.uint8), 512, rng)[0].size) for _ in range(50)) <= 2048


class _ScriptedRng:
    """Answers random() and uniform() from fixed lists, to walk one path through the colour jitter."""

    def __init__(self, randoms, uniforms):
        self.randoms, self.uniforms = list(randoms), list(uniforms)

    def random(self):
        return self.randoms.pop(0)

    def uniform(self, low, high):
        return self.uniforms.pop(0)


def test_colour_jitter_clips_after_each_step_like_ssd():
    # Brightness +32 then contrast x 0.5 (no saturation, no hue): ColorAugSSDTransform clips 250 + 32 to
    # 255 before the contrast, giving 127 (not (250 + 32) * 0.5 = 141); 100 -> 132 -> 66.
    img = np.array([[[250, 100, 0]]], np.uint8)
    out = segdata.photometric_distortion(img, _ScriptedRng([0.0, 0.0, 0.0, 0.9, 0.9], [32.0, 0.5]))
    assert out.tolist() == [[[127, 66, 16]]]


# ---------------------------------------------------------------- §3.4: p_aug

def test_p_aug_draws_synthetic_at_its_rate_from_every_folder():
    sizes = [5, 7]
    sampler = train_seg.MixedBatches(3, sizes, batch=4, p_aug=0.6, seed=0, start=0, stop=1000)
    draws = [d for batch in sampler for d in batch]
    source = np.array([s for s, _, _ in draws])
    n_syn = int((source > 0).sum())
    assert binomtest(n_syn, len(draws), 0.6).pvalue > 1e-3, n_syn / len(draws)
    # Uniform over the union of the folders: folder 2 holds 7 of the 12 synthetic samples.
    assert binomtest(int((source == 2).sum()), n_syn, 7 / 12).pvalue > 1e-3
    for k, size in enumerate(sizes, 1):
        assert {i for s, i, _ in draws if s == k} == set(range(size))
    real = [i for s, i, _ in draws if s == 0]
    assert np.bincount(real).min() > 0.9 * len(real) / 3  # epochs of the real samples, not random picks
    # A resumed sampler sees the same batches; another process sees others.
    assert list(train_seg.MixedBatches(3, sizes, 4, 0.6, 0, start=990, stop=1000)) == list(sampler)[990:]
    assert list(train_seg.MixedBatches(3, sizes, 4, 0.6, 0, 0, 10, rank=1, world=2)) != list(sampler)[:10]
    assert all(s == 0 for b in train_seg.MixedBatches(3, sizes, 4, 0.0, 0, 0, 50) for s, _, _ in b)
    assert all(s > 0 for b in train_seg.MixedBatches(3, sizes, 4, 1.0, 0, 0, 50) for s, _, _ in b)


def test_aug_draws_only_from_the_given_folders(tiny, tmp_path, monkeypatch):
    real = read_dataset("ade20k", ADE_ROOT, "val")
    a = _write_synthetic(tmp_path / "synth_a", real[:1])
    b = _write_synthetic(tmp_path / "synth_b", real[1:])
    monkeypatch.chdir(tmp_path)
    _write_synthetic(tmp_path / "synth/imgsyn-ade20k", real, n=1)  # a default folder that must stay unused
    _ok(_cli(["--data-root", ADE_ROOT, "--synthetic", a, "--synthetic", b, "--p-aug", "0.6", "--max-steps", "6",
              "--output-dir", tmp_path / "run", "--eval-size", "32", *FAST], tiny))
    drawn = json.loads((tmp_path / "run/metrics.json").read_text())["drawn"]
    assert set(drawn) == {"real", str(a), str(b)} and sum(drawn.values()) == 12
    assert drawn[str(a)] + drawn[str(b)] > 0
    # Without --synthetic, the default folders of common/data/paths.py are used.
    _ok(_cli(["--data-root", ADE_ROOT, "--max-steps", "2", "--output-dir", tmp_path / "run2", "--eval-size", "32", *FAST], tiny))
    assert set(json.loads((tmp_path / "run2/metrics.json").read_text())["drawn"]) == {"real", "synth/imgsyn-ade20k"}


def test_pretrain_runs_synthetic_then_real(tiny, tmp_path):
    real = read_dataset("ade20k", ADE_ROOT, "val")
    syn = _write_synthetic(tmp_path / "synth", real)
    _ok(_cli(["--data-root", ADE_ROOT, "--synthetic", syn, "--strategy", "pretrain", "--pretrain-steps", "4",
              "--max-steps", "4", "--output-dir", tmp_path / "run", "--eval-size", "32", *FAST], tiny))
    stats = _stats(tmp_path / "run")
    assert [(r["phase"], r["step"]) for r in stats] == [("pretrain-synthetic", 2), ("pretrain-synthetic", 4),
                                                        ("finetune-real", 2), ("finetune-real", 4)]
    assert [r["drawn"]["real"] for r in stats] == [0, 0, 4, 8]  # synthetic only, then real only
    assert [r["drawn"][str(syn)] for r in stats] == [4, 8, 8, 8]
    assert stats[1]["lr"] == 0 and stats[2]["lr"] > 0  # a fresh poly schedule for the fine-tuning


def test_real_pretrain_runs_two_fresh_phases_on_real_data_only(tiny, tmp_path):
    """Tables 2/3's "50+50" baseline in one command: real, then real again with a fresh schedule."""
    _ok(_cli(["--data-root", ADE_ROOT, "--strategy", "real-pretrain", "--pretrain-steps", "4", "--max-steps", "4",
              "--output-dir", tmp_path / "run", "--eval-size", "32", *FAST], tiny))
    stats = _stats(tmp_path / "run")
    assert [(r["phase"], r["step"]) for r in stats] == [("pretrain-real", 2), ("pretrain-real", 4), ("finetune-real", 2), ("finetune-real", 4)]
    assert [r["drawn"]["real"] for r in stats] == [4, 8, 12, 16] and all(set(r["drawn"]) == {"real"} for r in stats)
    assert stats[1]["lr"] == 0 and stats[2]["lr"] > 0  # the second phase starts its poly schedule afresh
    assert [p["name"] for p in json.loads((tmp_path / "run/metrics.json").read_text())["phases"]] == ["pretrain-real", "finetune-real"]


def test_resume_latest_continues_from_the_last_checkpoint(tiny, tmp_path):
    args = ["--data-root", ADE_ROOT, "--strategy", "real", "--max-steps", "4", "--eval-size", "32", "--eval-every", "2", *FAST]
    args[args.index("--checkpoint-every") + 1] = "2"
    _ok(_cli([*args, "--output-dir", tmp_path / "full"], tiny))
    assert sorted(p.name for p in (tmp_path / "full/checkpoints").iterdir()) == ["phase0-step0000002", "phase0-step0000004"]
    # An interrupted run: only the step-2 checkpoint made it, its history already held step 4's evaluation.
    shutil.copytree(tmp_path / "full/checkpoints/phase0-step0000002", tmp_path / "cut/checkpoints/phase0-step0000002")
    shutil.copy(tmp_path / "full/metrics_history.jsonl", tmp_path / "cut/metrics_history.jsonl")
    result = _ok(_cli([*args, "--output-dir", tmp_path / "cut", "--resume", "latest"], tiny))
    assert "resuming from" in result.output
    assert [r["step"] for r in _stats(tmp_path / "cut")] == [4]
    history = {run: [json.loads(x) for x in (tmp_path / run / "metrics_history.jsonl").read_text().splitlines()] for run in ("full", "cut")}
    assert [r["step"] for r in history["cut"]] == [2, 4]  # step 4 measured again, not twice
    assert [r["mIoU"] for r in history["cut"]] == pytest.approx([r["mIoU"] for r in history["full"]])
    full = json.loads((tmp_path / "full/metrics.json").read_text())
    cut = json.loads((tmp_path / "cut/metrics.json").read_text())
    assert cut["drawn"] == full["drawn"]
    # The same weights as the uninterrupted run: the loss's random point sampling is replayed exactly.
    from safetensors.torch import load_file

    want, got = (load_file(tmp_path / run / "model/model.safetensors") for run in ("full", "cut"))
    assert want.keys() == got.keys()
    assert max(float((want[k].float() - got[k].float()).abs().max()) for k in want) <= 1e-6
    # A checkpoint loads like any model folder (--eval-only --checkpoint).
    _ok(_cli(["--eval-only", "--checkpoint", tmp_path / "full/checkpoints/phase0-step0000004", "--data-root", ADE_ROOT,
              "--eval-size", "32", "--output-dir", tmp_path / "ev"]))
    assert json.loads((tmp_path / "ev/metrics.json").read_text())["single_scale"] == full["single_scale"]


# ---------------------------------------------------------------- bad inputs

def test_all_ignore_images_are_skipped_and_counted(tiny, tmp_path):
    real = read_dataset("ade20k", ADE_ROOT, "val")
    empty = _write_synthetic(tmp_path / "empty_labels", real[:1], label=lambda lab: np.zeros_like(lab))
    good = _write_synthetic(tmp_path / "good", real[:1])
    _ok(_cli(["--data-root", ADE_ROOT, "--synthetic", empty, "--synthetic", good, "--strategy", "synthetic",
              "--max-steps", "6", "--output-dir", tmp_path / "run", "--eval-size", "32", *FAST], tiny))
    got = json.loads((tmp_path / "run/metrics.json").read_text())
    assert got["drawn"][str(empty)] > 0
    assert got["skipped_images"] == got["drawn"][str(empty)]


@pytest.mark.parametrize("case, message", [
    ("missing", r"synthetic folder .*nowhere does not exist: run masksyn.py or imgsyn.py first"),
    ("empty", r"synthetic folder .*empty has no samples"),
    ("other_dataset", r"--synthetic .*coco_labels: .*label values \[151, 200\] are not ade20k classes.*another dataset"),
    ("no_default", r"--strategy aug needs synthetic data, but neither synth/masksyn-ade20k nor synth/imgsyn-ade20k exists"),
    ("p_aug", r"--p-aug"),
    ("eval_only", r"--eval-only needs --checkpoint"),
    ("both_models", r"either --model .* or --backbone"),
    # accepted before, and wrong (issue 28, class 6)
    ("lr_inf", r"--lr must be a positive finite number \(got inf\)"),
    ("p_aug_with_real", r"--p-aug applies to --strategy aug only \(got --strategy real"),
    ("synthetic_twice", r"--synthetic .*twice.*would double its share"),
    ("drawn_for_toy", r"--synthetic .*toy_folder was drawn for --data toy .*not --data ade20k"),
    ("not_mask2former", r"--model .*vit is a 'vit' model, not Mask2Former"),
    ("metrics_file_dir", r"--metrics-file .* is a folder; pass a file name"),
])
def test_bad_inputs_get_one_clear_error(case, message, tiny, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = read_dataset("ade20k", ADE_ROOT, "val")
    args = ["--data-root", ADE_ROOT, "--output-dir", tmp_path / "run", *FAST]
    if case == "missing":
        args += ["--synthetic", tmp_path / "nowhere"]
    elif case == "empty":
        (tmp_path / "empty").mkdir()
        args += ["--synthetic", tmp_path / "empty"]
    elif case == "other_dataset":
        def coco_like(lab):
            lab = lab.copy()
            lab[0, :3] = 151, 200, 200
            return lab
        args += ["--synthetic", _write_synthetic(tmp_path / "coco_labels", real[:1], label=coco_like)]
    elif case == "p_aug":
        args += ["--p-aug", "1.5"]
    elif case == "eval_only":
        args += ["--eval-only"]
    elif case == "both_models":
        args += ["--backbone", "swin-t", "--strategy", "real"]
    elif case == "lr_inf":
        args += ["--lr", "inf", "--strategy", "real"]
    elif case == "p_aug_with_real":
        args += ["--p-aug", "0.3", "--strategy", "real"]
    elif case == "synthetic_twice":
        syn = _write_synthetic(tmp_path / "syn", real[:1])
        args += ["--synthetic", syn, "--synthetic", tmp_path / "." / "syn"]
    elif case == "drawn_for_toy":
        args += ["--synthetic", _write_synthetic(tmp_path / "toy_folder", real[:1], settings={"data": "toy"})]
    elif case == "not_mask2former":
        from transformers import ViTConfig

        (tmp_path / "vit").mkdir()
        ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32).save_pretrained(tmp_path / "vit")
        result = _cli([*args, "--model", tmp_path / "vit", "--strategy", "real"])
        assert result.exit_code == 2 and re.search(message, " ".join(result.output.split())), result.output
        return
    elif case == "metrics_file_dir":
        args += ["--metrics-file", tmp_path, "--strategy", "real"]
    result = _cli(args, tiny)
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output
    assert not (tmp_path / "run/stats.jsonl").exists()  # no training started


# ---------------------------------------------------------------- COCO panoptic / instance

from common.masks.colormap import coco_categories  # noqa: E402
from conftest import COCO_ROOT  # noqa: E402


@pytest.fixture(scope="module")
def coco_train(tmp_path_factory):
    """A COCO root whose train split is a copy of the 2 real val samples."""
    root = tmp_path_factory.mktemp("coco") / "coco"
    shutil.copytree(COCO_ROOT, root)
    shutil.copytree(root / "val2017", root / "train2017")
    shutil.copytree(root / "annotations/panoptic_val2017", root / "annotations/panoptic_train2017")
    shutil.copy(root / "annotations/panoptic_val2017.json", root / "annotations/panoptic_train2017.json")
    return root


def test_coco_targets_leave_out_crowd_and_keep_things_for_instance():
    sample = read_dataset("coco", COCO_ROOT, "val")[0]
    ids = load_panoptic(sample)
    for task in ("panoptic", "instance"):  # instance: the 80-class head's train ids
        lut = segdata.instance_train_ids() if task == "instance" else segdata.coco_train_ids()
        target = segdata.load_target(sample, "coco", task)
        masks, classes, keep = segdata.mask_targets(torch.from_numpy(target)[None])
        expect = [s for s in sample.segments if not s["iscrowd"]
                  and (task == "panoptic" or next(c for c in coco_categories() if c["id"] == s["category_id"])["isthing"])]
        assert sorted(classes[0].tolist()) == sorted(int(lut[s["category_id"]]) for s in expect)
        assert sorted(m.sum().item() for m in masks[0]) == sorted(float((ids == s["id"]).sum()) for s in expect)
    crowd = next(s for s in sample.segments if s["iscrowd"])
    assert (segdata.load_target(sample, "coco", "panoptic")[ids == crowd["id"]] == -1).all()


def test_dataloader_workers_find_the_segments_whose_masks_partition_the_labelled_pixels():
    # train_seg's DataLoader (one worker process, segdata.collate) hands over each image's segment ids; the step's
    # masks (mask_target on the label map and those ids) cover each labelled pixel once, one segment and class each.
    ade = read_dataset("ade20k", ADE_ROOT, "train") + read_dataset("ade20k", ADE_ROOT, "val")
    coco = read_dataset("coco", COCO_ROOT, "val")
    for data, samples, task in (("ade20k", ade, "semantic"), ("coco", coco, "panoptic")):
        dataset = segdata.SegData([samples], data, 96, task=task)
        keys = [[(0, i, 7 * i), (0, (i + 1) % len(samples), 7 * i + 1)] for i in range(len(samples))]
        loader = torch.utils.data.DataLoader(dataset, batch_sampler=keys, num_workers=1, collate_fn=segdata.collate)
        for batch, batch_keys in zip(map(as_tensors, loader), keys):
            assert batch["image"].shape == (2, 3, 96, 96) and batch["label"].shape == (2, 96, 96)
            for key, lab, ids, keep in zip(batch_keys, batch["label"], batch["segments"].split(batch["counts"]), batch["keep"]):
                assert torch.equal(lab, dataset[key]["label"])  # the same augmentation, drawn again from the key's seed
                masks, classes = segdata.mask_target(lab, ids)
                assert masks.dtype == torch.bool and masks.shape[1:] == (96, 96) and len(masks) == len(classes) > 0
                assert torch.equal(masks.sum(0), (lab >= 0).long())  # each labelled pixel in exactly one mask
                for m, c in zip(masks, classes):  # one segment per mask, of that class
                    assert len(torch.unique(lab[m])) == 1 and int(lab[m][0]) // segdata.SEG == int(c)
                assert bool(keep)
    hrnet = as_tensors(segdata.collate([segdata.SegData([ade], "ade20k", 96, segments=False)[(0, 0, 0)]]))  # HRNet: the label map
    assert "segments" not in hrnet and hrnet["label"].shape == (1, 96, 96) and hrnet["keep"].tolist() == [True]


class _Oracle(torch.nn.Module):
    """Answers each image with its ground-truth segments as queries (logits +-20), at the input size."""

    def __init__(self, segments_per_image, num_classes=133, queries=40):
        super().__init__()
        self.per_image, self.calls, self.num_classes, self.queries = segments_per_image, 0, num_classes, queries
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, pixel_values, pixel_mask):
        masks, classes = self.per_image[self.calls]
        self.calls += 1
        h, w = int(pixel_mask[0].any(1).sum()), int(pixel_mask[0].any(0).sum())
        resized = torch.nn.functional.interpolate(masks[None].float(), size=(h, w), mode="nearest")[0]
        logits = torch.full((1, self.queries, *pixel_values.shape[-2:]), -20.0)
        logits[0, :len(masks), :h, :w] = resized * 40 - 20
        cls = torch.full((1, self.queries, self.num_classes + 1), -20.0)
        cls[0, torch.arange(self.queries), self.num_classes] = 20.0  # no object
        cls[0, torch.arange(len(classes)), self.num_classes] = -20.0
        cls[0, torch.arange(len(classes)), classes] = 20.0
        from types import SimpleNamespace
        return SimpleNamespace(masks_queries_logits=logits, class_queries_logits=cls)


def test_panoptic_and_instance_evaluation_at_original_resolution_with_an_oracle():
    from accelerate import Accelerator

    samples = read_dataset("coco", COCO_ROOT, "val")
    lut = segdata.coco_train_ids()
    per_image = []
    for s in samples:
        ids = torch.from_numpy(load_panoptic(s))
        per_image.append((torch.stack([ids == seg["id"] for seg in s.segments]),
                          torch.tensor([int(lut[seg["category_id"]]) for seg in s.segments])))
    sizes = {min(load_panoptic(s).shape) for s in samples}
    # At an image's own short side (and a long side within detectron2's 1333/800 limit) nothing is
    # resized: every metric is exactly 1.
    exact = [(s, pi) for s, pi in zip(samples, per_image)
             if max(load_panoptic(s).shape) <= round(min(load_panoptic(s).shape) * 1333 / 800)]
    assert exact
    for s, pi in exact:
        short = min(load_panoptic(s).shape)
        got = segeval.evaluate(_Oracle([pi]), [s], "coco", short, [0.5] * 3, [0.5] * 3, Accelerator(cpu=True), False, task="panoptic")
        assert got["panoptic"]["PQ"] == 1.0 and got["instance"]["AP"] == pytest.approx(1.0) and got["mIoU"] == 1.0
    # Through a smaller test size the masks are resized there and back: still matched, a little off.
    got = segeval.evaluate(_Oracle(per_image), samples, "coco", min(sizes) // 2, [0.5] * 3, [0.5] * 3,
                             Accelerator(cpu=True), False, task="panoptic")
    assert 0.8 < got["panoptic"]["PQ"] < 1.0 and got["panoptic"]["RQ"] == 1.0, got["panoptic"]
    assert got["instance"]["AP"] > 0.6 and got["mIoU"] > 0.9
    labels = [segdata.load_train_label(s, "coco") for s in samples]
    assert got["pixels"] == sum(int((lab != 255).sum()) for lab in labels)  # scored at full resolution


def test_coco_panoptic_training_runs_with_the_scaled_multistep_schedule(tiny, coco_train, tmp_path):
    fast = FAST[:FAST.index("--log-every")] + ["--log-every", "1"]
    _ok(_cli(["--data", "coco", "--data-root", coco_train, "--strategy", "real", "--max-steps", "10",
              "--output-dir", tmp_path / "run", "--eval-size", "64", *fast], tiny))
    got = json.loads((tmp_path / "run/metrics.json").read_text())
    assert got["task"] == "panoptic" and got["drawn"] == {"real": 20}
    # Base-COCO-PanopticSegmentation.yaml: x 0.1 at 327,778 and 355,092 of 368,750 iterations -> at 8.89 and 9.63 of 10.
    # The lr logged after iteration s is the one iteration s + 1 runs with (head lr; backbone x 0.1).
    lrs = [r["lr"] for r in _stats(tmp_path / "run")]
    scaled = [m * 10 / 368_750 for m in (327_778, 355_092)]
    assert lrs == pytest.approx([1e-4 * 0.1 ** sum(s >= m for m in scaled) for s in range(1, 11)])
    assert lrs[7:] == pytest.approx([1e-4, 1e-5, 1e-6])
    r = train_seg.RECIPES[("coco", "swin-l")]
    assert (r.max_steps, r.milestones, r.queries, r.warmup, r.warmup_factor) == (737_500, (655_556, 710_184), 200, 10, 1.0)
    assert segmodel.lr_factor(0, 10, "multistep", (5,), 10, warmup=10, warmup_factor=0.5) == 0.5  # a warm-up with effect
    assert {"PQ", "PQ_th", "PQ_st"} <= set(got["single_scale"]["panoptic"]) and "AP" in got["single_scale"]["instance"]


def test_optimizer_groups_follow_mask2former(tiny):
    net, _ = segmodel.build_model(str(tiny), None, "ade20k")
    segmodel.freeze_unused(net)
    groups = segmodel.param_groups(net, 1e-4, 0.05, 0.1)
    where = {id(p): (g["lr"], g["weight_decay"]) for g in groups for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(where) == sum(p.requires_grad for p in net.parameters())
    named = dict(net.named_parameters())
    backbone = "model.pixel_level_module.encoder."
    assert where[id(named[backbone + "swin.embeddings.patch_embeddings.projection.weight"])] == (1e-5, 0.05)
    assert where[id(named[backbone + "hidden_states_norms.stage1.weight"])] == (1e-5, 0.0)
    table = next(n for n in named if n.endswith("relative_position_bias_table"))
    assert where[id(named[table])] == (1e-5, 0.0)
    assert where[id(named["model.transformer_module.queries_embedder.weight"])] == (1e-4, 0.0)
    assert where[id(named["class_predictor.weight"])] == (1e-4, 0.05)
    assert not named[backbone + "swin.layernorm.weight"].requires_grad  # unused by Mask2Former: frozen for DDP


def test_two_process_run_splits_the_batch_and_combines_the_metrics(tiny, tmp_path):
    """A real 2-process gloo run (`accelerate launch --cpu` would run only one)."""
    import os
    import subprocess
    import sys

    env = dict(os.environ, ACCELERATE_USE_CPU="true", PYTHONPATH=str(ADE_ROOT.parents[2]))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(ADE_ROOT.parents[2] / "train_seg.py"),
           "--data-root", str(ADE_ROOT), "--strategy", "real", "--max-steps", "2", "--batch-size", "4", "--crop", "64",
           "--num-workers", "0", "--checkpoint-every", "0", "--log-every", "1", "--eval-size", "32", "--eval-every", "2",
           "--model", str(tiny), "--output-dir", str(tmp_path / "run")]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "2 process(es)" in done.stderr
    got = json.loads((tmp_path / "run/metrics.json").read_text())
    assert got["drawn"] == {"real": 8}  # 2 steps x global batch 4, counted over both processes
    labels = [load_label(s, "ade20k") for s in read_dataset("ade20k", ADE_ROOT, "val")]
    assert got["single_scale"]["pixels"] == sum(int((lab > 0).sum()) for lab in labels)  # both halves of val
    # --eval-every: one record of both processes' halves, the same figure as the final evaluation of that model
    (rec,) = [json.loads(x) for x in (tmp_path / "run/metrics_history.jsonl").read_text().splitlines()]
    assert rec["images"] == len(labels) and rec["mIoU"] == pytest.approx(got["single_scale"]["mIoU"])
    assert got["best"]["step"] == 2 and (tmp_path / "run/model-best/config.json").is_file()


def _write_coco_synthetic(folder, with_segments=True):
    """A COCO synthetic folder: copies of the real panoptic samples with their segments_info."""
    for sub in ("images", "annotations", "colormaps"):
        (folder / sub).mkdir(parents=True)
    with ManifestWriter(folder / "manifest.jsonl", path_fields=("image", "annotation", "colormap")) as w:
        for s in read_dataset("coco", COCO_ROOT, "val"):
            sid = f"syn_{s.id}"
            shutil.copy(s.image, folder / f"images/{sid}.jpg")
            shutil.copy(s.annotation, folder / f"annotations/{sid}.png")
            shutil.copy(s.annotation, folder / f"colormaps/{sid}.png")
            rec = {"id": sid, "source_id": s.id, "method": "imgsyn", "image": f"images/{sid}.jpg",
                   "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png", "caption": "",
                   "seed": 0, "models": {}}
            if with_segments:
                rec["segments_info"] = s.segments
            w.append(rec)
    return folder


def test_coco_defaults_to_pretrain_on_synthetic_then_real(tiny, coco_train, tmp_path):
    syn = _write_coco_synthetic(tmp_path / "synth")
    args = ["--data", "coco", "--data-root", coco_train, "--synthetic", syn, "--pretrain-steps", "2", "--max-steps", "2",
            "--output-dir", tmp_path / "run", "--eval-size", "64", *FAST]
    _ok(_cli(args, tiny))
    stats = _stats(tmp_path / "run")
    assert [(r["phase"], r["drawn"]["real"], r["drawn"][str(syn)]) for r in stats] == [
        ("pretrain-synthetic", 0, 4), ("finetune-real", 4, 4)]
    assert json.loads((tmp_path / "run/metrics.json").read_text())["strategy"] == "pretrain"  # COCO's default
    bad = _write_coco_synthetic(tmp_path / "no_segments", with_segments=False)
    args[args.index("--synthetic") + 1] = bad
    result = _cli(args, tiny)
    assert result.exit_code == 2 and "no segments_info in the manifest" in " ".join(result.output.split())


# ---------------------------------------------------------------- HRNet (§4, A.3, Table 4b)

HRNET = ["--backbone", "hrnet-small", "--batch-size", "2", "--crop", "64", "--eval-size", "32", "--num-workers", "0", "--log-every", "1"]


def test_hrnet_trains_with_its_recipe_resumes_and_evaluates_its_saved_model(ade_all, tmp_path):
    from common.seg import hrnet
    from quality import load_segmenter

    args = ["--data-root", ade_all, "--strategy", "real", "--max-steps", "4", "--checkpoint-every", "2", *HRNET]
    _ok(_cli([*args, "--output-dir", tmp_path / "full"]))
    got = json.loads((tmp_path / "full/metrics.json").read_text())
    options = json.loads((tmp_path / "full/options.json").read_text())
    assert got["recipe"] == "ade20k/hrnet-small" and got["weights"] == "random" and got["drawn"] == {"real": 8}
    assert 0 <= got["single_scale"]["mIoU"] <= 1 and got["single_scale"]["pixels"] > 0
    # A.3: SGD lr 2e-2 (momentum 0.9), weight decay 1e-4, poly 0.9, no clipping; HRNet's ADE20K pipeline (test below).
    assert (options["optimizer"], options["lr"], options["momentum"], options["weight_decay"], options["grad_clip"]) == ("sgd", 2e-2, 0.9, 1e-4, 0.0)
    assert [r["lr"] for r in _stats(tmp_path / "full")] == pytest.approx([2e-2 * (1 - s / 4) ** 0.9 for s in (1, 2, 3, 4)])
    # RUN/model is hrnet.save's folder: hrnet.load and quality.py read it, --eval-only scores it the same.
    model = hrnet.load(tmp_path / "full/model")
    assert model.num_classes == 150 and load_segmenter(tmp_path / "full/model", 150, "cpu").kind == "hrnet"
    _ok(_cli(["--eval-only", "--checkpoint", tmp_path / "full/model", "--data-root", ade_all, "--eval-size", "32", "--output-dir", tmp_path / "ev"]))
    assert json.loads((tmp_path / "ev/metrics.json").read_text())["single_scale"] == got["single_scale"]
    # Resumed from step 2: the same weights (BatchNorm statistics included) as the uninterrupted run.
    shutil.copytree(tmp_path / "full/checkpoints/phase0-step0000002", tmp_path / "cut/checkpoints/phase0-step0000002")
    assert "resuming from" in _ok(_cli([*args, "--output-dir", tmp_path / "cut", "--resume", "latest"])).output
    resumed = hrnet.load(tmp_path / "cut/model").state_dict()
    assert all(torch.equal(v, resumed[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("strategy", ["aug", "pretrain"])
def test_hrnet_trains_with_synthetic_data(strategy, tmp_path):
    real = read_dataset("ade20k", ADE_ROOT, "val")
    syn = _write_synthetic(tmp_path / "synth", real)
    p_aug = ["--p-aug", "0.6"] if strategy == "aug" else []  # pretrain has no p_aug (refused there)
    _ok(_cli(["--data-root", ADE_ROOT, "--synthetic", syn, "--strategy", strategy, *p_aug, "--max-steps", "2",
              "--checkpoint-every", "0", "--output-dir", tmp_path / "run", *HRNET]))
    got = json.loads((tmp_path / "run/metrics.json").read_text())
    assert sum(got["drawn"].values()) == (8 if strategy == "pretrain" else 4) and got["drawn"][str(syn)] > 0
    assert "mIoU" in got["single_scale"]


def test_hrnet_is_a_semantic_segmenter_for_ade20k(tmp_path):
    result = _cli(["--data", "coco", "--backbone", "hrnet-w48", "--output-dir", tmp_path])
    assert result.exit_code == 2 and "--backbone hrnet-w48 has no recipe for --data coco" in result.output


def test_no_augment_removes_exactly_what_a9_names():
    # A.9: "we eliminate color augmentation, random flipping, and random cropping"; the random resize stays.
    a9 = segdata.without_a9(segdata.AUGMENTS["ade20k"])
    assert (a9.colour, a9.flip, a9.crop, a9.resize) == (False, False, False, "ade20k")
    train = read_dataset("ade20k", ADE_ROOT, "val")[1]
    data = segdata.SegData([[train]], "ade20k", 96, augment=a9)
    image, target = segdata.load_image(train.image), segdata.load_target(train, "ade20k", "semantic")
    shapes = set()
    for seed in range(8):
        got = data[(0, 0, seed)]
        # Exactly the centre window of the randomly resized sample: no colour change, no flip, no random offset.
        resized, label = segdata.random_resize(image, target, 96, np.random.default_rng(seed))
        img, lab, _ = segdata.center_crop(np.asarray(resized), label, 96)
        assert np.array_equal(got["image"].numpy(), img.transpose(2, 0, 1)) and np.array_equal(got["label"].numpy(), lab)
        shapes.add(resized.size)
    assert len(shapes) > 1  # the scale jitter is still drawn


def test_synthetic_folder_count_takes_the_first_k_per_source(tmp_path):
    from common.data.datasets import read_synthetic

    real = read_dataset("ade20k", ADE_ROOT, "val")
    folder = _write_synthetic(tmp_path / "syn", real[::-1], n=3)  # sources written in reverse order
    assert segdata.split_count(tmp_path / "syn:2") == (folder, 2) and segdata.split_count(folder) == (folder, None)
    got = segdata.first_per_source(read_synthetic(folder), 2)
    assert [(s.meta["source_id"], s.meta["k"]) for s in got] == [(r.id, k) for r in real for k in (0, 1)]
    args = SimpleNamespace(strategy=train_seg.Strategy.synthetic, synthetic=[tmp_path / "syn:1"], data="ade20k")
    _, synthetic, folders = segdata.read_sources(args, print)
    assert folders == [folder] and [s.id for s in synthetic[0]] == [f"syn_{r.id}_s0" for r in real]
    assert not isinstance(synthetic[0], list) and list(synthetic[0]) == segdata.first_per_source(read_synthetic(folder), 1)  # a lazy index view


# ---------------------------------------------------------------- FreeMask: filtered annotations, hardness resampling (issue 13)

def _write_quality(folder, hard_ids=()):
    """quality.jsonl as quality.py writes it (id + per-class [mean loss, pixels]); `hard_ids` get a high-loss class."""
    from common.data.datasets import read_synthetic

    with open(folder / "quality.jsonl", "w") as f:
        for s in read_synthetic(folder):
            loss = {"0": [5.0, 100], "1": [5.0, 100]} if s.id in hard_ids else {"0": [0.1, 100]}
            f.write(json.dumps({"id": s.id, "miou": 0.5, "accuracy": 0.5, "loss": loss, "iou": {}}) + "\n")


def test_hardness_sampling_draws_by_the_given_probabilities_and_resumes_exactly():
    p = np.array([0.5, 0.0, 0.1, 0.4])  # folder 1: samples 0, 1; folder 2: samples 0, 1
    sampler = train_seg.MixedBatches(3, [2, 2], batch=4, p_aug=1.0, seed=0, start=0, stop=500, weights=p)
    draws = [(s, i) for batch in sampler for s, i, _ in batch]
    assert (1, 1) not in draws  # probability 0: never drawn
    for (s, i), pk in zip([(1, 0), (2, 0), (2, 1)], p[[0, 2, 3]]):
        assert binomtest(draws.count((s, i)), len(draws), pk).pvalue > 1e-3
    assert list(train_seg.MixedBatches(3, [2, 2], 4, 1.0, 0, start=490, stop=500, weights=p)) == list(sampler)[490:]
    with pytest.raises(train_seg.SegGenError, match="--synthetic-sampling"):
        train_seg.MixedBatches(3, [2, 2], 4, 1.0, 0, 0, 1, weights=p[:3] / p[:3].sum())


def test_synthetic_weights_keep_each_folders_share_and_follow_freemask(tmp_path):
    from common.seg import quality
    from common.data.datasets import read_synthetic, synthetic_index

    real = read_dataset("ade20k", ADE_ROOT, "val")
    a = _write_synthetic(tmp_path / "a", real, n=2)  # 4 samples
    b = _write_synthetic(tmp_path / "b", real[:1], n=2)  # 2 samples
    _write_quality(a, hard_ids={f"a_{real[0].id}_s0"})
    _write_quality(b)
    samples = [read_synthetic(a), read_synthetic(b)]
    w = segdata.synthetic_weights([a, b], samples, "ade20k", "hardness")
    assert segdata.synthetic_weights([a, b], [synthetic_index(a), synthetic_index(b)], "ade20k", "hardness").tolist() == w.tolist()
    assert w.shape == (6,) and w.sum() == pytest.approx(1.0)
    assert w[:4].sum() == pytest.approx(4 / 6) and w[4:].sum() == pytest.approx(2 / 6)  # the uniform draw's shares
    assert w[:4] == pytest.approx(quality.sampling_probabilities(a, samples[0], 150) * 4 / 6)
    assert w[:4].argmax() == [s.id for s in samples[0]].index(f"a_{real[0].id}_s0")  # the hard mask is drawn most
    assert segdata.synthetic_weights([a, b], samples, "ade20k", "uniform") is None


def test_synthetic_filtered_trains_on_annotations_filtered(tiny, tmp_path):
    from common.seg import quality
    from common.data.datasets import read_synthetic

    real = read_dataset("ade20k", ADE_ROOT, "val")
    folder = _write_synthetic(tmp_path / "syn", real[:1])
    (folder / "annotations_filtered").mkdir()
    for s in read_synthetic(folder):  # the filter ignored everything: every synthetic image is left out of the loss
        Image.fromarray(np.zeros_like(load_label(s, "ade20k"))).save(folder / "annotations_filtered" / s.annotation.name)
    args = SimpleNamespace(strategy=train_seg.Strategy.synthetic, synthetic=[folder], data="ade20k", synthetic_filtered=True)
    _, synthetic, _ = segdata.read_sources(args, print)
    assert [s.annotation.parent.name for s in synthetic[0]] == ["annotations_filtered"] * 2
    assert list(synthetic[0]) == quality.filtered_samples(folder, read_synthetic(folder))  # the index's view, as the list's
    base = ["--data-root", ADE_ROOT, "--synthetic", folder, "--strategy", "synthetic", "--max-steps", "2", "--eval-size", "32", *FAST]
    _ok(_cli([*base, "--synthetic-filtered", "--output-dir", tmp_path / "f"], tiny))
    got = json.loads((tmp_path / "f/metrics.json").read_text())
    assert got["skipped_images"] == got["drawn"][str(folder)] == 4
    r = _cli([*base, "--synthetic-sampling", "hardness", "--output-dir", tmp_path / "h"], tiny)  # no quality.jsonl yet
    assert r.exit_code == 2 and "run quality.py --synthetic" in r.output
    _write_quality(folder)
    _ok(_cli([*base, "--synthetic-sampling", "hardness", "--output-dir", tmp_path / "h"], tiny))
    assert json.loads((tmp_path / "h/metrics.json").read_text())["skipped_images"] == 0


def _instances_json(path, samples, shift=False):
    """COCO's instances_val2017.json for `samples`, derived from their panoptic things (pycocotools RLE);
    shift: every annotation moved to the next thing category (a ground truth the panoptic one disagrees with)."""
    from pycocotools import mask as mask_util

    things = sorted(c["id"] for c in coco_categories() if c["isthing"])
    images, anns = [], []
    for n, s in enumerate(samples, 1):
        ids = load_panoptic(s)
        images.append({"id": n, "file_name": s.image.name, "height": ids.shape[0], "width": ids.shape[1]})
        for seg in s.segments:
            if seg["category_id"] in things:
                rle = mask_util.encode(np.asfortranarray((ids == seg["id"]).astype(np.uint8)))
                cat = things[(things.index(seg["category_id"]) + 1) % len(things)] if shift else seg["category_id"]
                anns.append({"id": len(anns) + 1, "image_id": n, "category_id": cat, "iscrowd": int(seg["iscrowd"]),
                             "segmentation": {"size": rle["size"], "counts": rle["counts"].decode()}, "area": float(mask_util.area(rle))})
    path.write_text(json.dumps({"images": images, "annotations": anns, "categories": [{"id": c} for c in things]}))
    return path


def test_instance_head_has_the_80_things_and_ap_uses_the_instances_file_when_given(tmp_path):
    from accelerate import Accelerator

    assert len(segdata.class_names("coco", "instance")) == 80 and len(segdata.class_names("coco")) == 133
    samples = read_dataset("coco", COCO_ROOT, "val")
    lut = segdata.instance_train_ids()
    per_image = []  # the oracle answers with the non-crowd things, in the 80-class head's ids
    for s in samples:
        ids, segs = torch.from_numpy(load_panoptic(s)), [g for g in s.segments if lut[g["category_id"]] != 255 and not g["iscrowd"]]
        per_image.append((torch.stack([ids == g["id"] for g in segs]), torch.tensor([int(lut[g["category_id"]]) for g in segs])))
    exact = [(s, pi) for s, pi in zip(samples, per_image)
             if max(load_panoptic(s).shape) <= round(min(load_panoptic(s).shape) * 1333 / 800)]
    s, pi = exact[0]
    short = min(load_panoptic(s).shape)

    def ap(instances):
        return segeval.evaluate(_Oracle([pi], num_classes=80), [s], "coco", short, [0.5] * 3, [0.5] * 3, Accelerator(cpu=True),
                                 False, task="instance", instances=instances)["instance"]["AP"]

    assert ap(None) == pytest.approx(1.0)  # from the panoptic things
    assert ap(_instances_json(tmp_path / "same.json", samples)) == pytest.approx(1.0)
    assert ap(_instances_json(tmp_path / "shifted.json", samples, shift=True)) == 0.0  # the file, not the panoptic PNG, is the truth


def test_coco_instance_run_says_where_its_ap_came_from(tiny, coco_train, tmp_path):
    root = tmp_path / "coco"
    shutil.copytree(coco_train, root)
    args = ["--data", "coco", "--data-root", root, "--task", "instance", "--strategy", "real", "--max-steps", "2", "--eval-size", "64", *FAST]
    _ok(_cli([*args, "--output-dir", tmp_path / "a"], tiny))
    got = json.loads((tmp_path / "a/metrics.json").read_text())
    assert got["task"] == "instance" and "panoptic things" in got["ap_source"] and "AP" in got["single_scale"]["instance"]
    assert len(json.loads((tmp_path / "a/model/config.json").read_text())["id2label"]) == 80  # the thing head
    instances = _instances_json(root / "annotations/instances_val2017.json", read_dataset("coco", root, "val"))
    _ok(_cli([*args, "--output-dir", tmp_path / "b"], tiny))
    assert json.loads((tmp_path / "b/metrics.json").read_text())["ap_source"] == str(instances)


# ---------------------------------------------------------------- one job per run folder; empty default folders (issues 16, 17)

def test_a_second_run_on_the_same_output_dir_exits_2_naming_the_holder(tiny, tmp_path):
    import os

    from common.runtime.lock import output_lock

    with output_lock(tmp_path / "run", rank=0, flag="--output-dir"):  # another job writing there
        r = _cli(["--data-root", ADE_ROOT, "--strategy", "real", "--max-steps", "2", "--output-dir", tmp_path / "run", "--eval-size", "32", *FAST], tiny)
    assert r.exit_code == 2, r.output
    out = " ".join(r.output.split())
    assert "--output-dir" in out and str(os.getpid()) in out, out
    assert not (tmp_path / "run/stats.jsonl").exists()


def test_an_empty_default_synthetic_folder_is_skipped_with_a_warning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    real = read_dataset("ade20k", ADE_ROOT, "val")
    (tmp_path / "synth/masksyn-ade20k").mkdir(parents=True)  # a masksyn run that stopped before its first sample
    (tmp_path / "synth/masksyn-ade20k/manifest.jsonl").write_text("")
    _write_synthetic(tmp_path / "synth/imgsyn-ade20k", real[:1], n=1)
    said = []
    args = SimpleNamespace(strategy=train_seg.Strategy.synthetic, synthetic=[], data="ade20k")
    _, synthetic, folders = segdata.read_sources(args, said.append)
    assert [str(f) for f in folders] == ["synth/imgsyn-ade20k"] and len(synthetic[0]) == 1
    assert any("skipping the default synthetic folder synth/masksyn-ade20k" in x for x in said)
    with pytest.raises(train_seg.SegGenError, match="has no samples"):  # given explicitly, it still fails
        segdata.read_sources(SimpleNamespace(strategy=train_seg.Strategy.synthetic, synthetic=[tmp_path / "synth/masksyn-ade20k"], data="ade20k"), print)


# ---------------------------------------------------------------- HRNet's official ADE20K pipeline (issue 25 item 2)

def test_hrnet_scales_the_long_side_as_hrnets_multi_scale_aug():
    # HRNet-Semantic-Segmentation base_dataset.py: long side int(520 * s + 0.5), s = 0.5 + randint(0, 11) / 10.
    rng = np.random.default_rng(0)
    image, label = Image.new("RGB", (300, 200)), np.zeros((200, 300), np.uint8)
    longs = {max(segdata.random_resize(image, label, 520, rng, kind="hrnet")[0].size) for _ in range(400)}
    assert longs == {int(520 * (0.5 + k / 10) + 0.5) for k in range(12)}  # 260, 312, .., 832


def test_hrnet_takes_random_crops_off_centre_with_flips(tmp_path):
    """Today's complaint was a centre crop that never showed the sides of wide images: a horizontal gradient
    (R = column) shows where each crop lies; HRNet's crops reach both ends and pad with 0 / ignore."""
    from common.data.sample import Sample

    w, h = 256, 96
    ramp = np.broadcast_to(np.linspace(0, 255, w).round().astype(np.uint8)[None, :, None], (h, w, 3)).copy()
    Image.fromarray(ramp).save(tmp_path / "wide.png")
    Image.fromarray(np.full((h, w), 5, np.uint8)).save(tmp_path / "wide_label.png")  # every pixel ADE20K class 5
    data = segdata.SegData([[Sample("wide", tmp_path / "wide.png", tmp_path / "wide_label.png")]], "ade20k", 64,
                           augment=segdata.AUGMENTS["hrnet"], segments=False)
    ends, flips, padded = [], 0, 0
    for seed in range(60):
        item = data[(0, 0, seed)]
        red = item["image"][0, 0][item["valid"][0]].float()  # the ramp along the first row's image pixels (padding: right, below)
        flips += bool(red[0] > red[-1])
        ends.append((float(red.min()), float(red.max())))
        padded += int((~item["valid"]).any())
        assert (item["image"][:, ~item["valid"]] == 0).all() and (item["label"][~item["valid"]] == -1).all()
    centre = [(lo, hi) for lo, hi in ends if lo > 20 and hi < 235]
    assert any(lo < 8 for lo, _ in ends) and any(hi > 247 for _, hi in ends)  # crops at the left and at the right end
    assert len({round(lo) for lo, _ in ends}) > 10 and len(centre) < len(ends)  # many positions, not one centre window
    assert 15 < flips < 45 and padded > 0  # flip with p 1/2; the 96-px-high image scaled below the crop is padded


def test_recipe_rows_name_their_sources():
    from common.seg.recipes import RECIPES

    assert RECIPES[("ade20k", "hrnet-w48")].source.endswith("seg_hrnet_w48_520x520_ohem_sgd_lr2e-2_wd1e-4_bs_16_epoch120.yaml")
    assert RECIPES[("ade20k", "hrnet-w48")].augment == "hrnet" and RECIPES[("ade20k", "hrnet-w48")].crop == 520
    assert "maskformer2_swin_large_IN21k_384_bs16_100ep" in RECIPES[("coco", "swin-l")].source
    assert all(r.source for r in RECIPES.values())
    assert "source" in _cli(["--help"]).output


# ---------------------------------------------------------------- --eval-every: Fig. 11's curves, trackers, best model (issue 25 item 5)

def test_eval_every_writes_the_history_logs_the_tracker_and_keeps_the_best(tiny, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    args = ["--data-root", ADE_ROOT, "--strategy", "real", "--max-steps", "4", "--eval-size", "32", "--eval-every", "2",
            "--eval-samples", "1", "--report-to", "tensorboard", *FAST]
    _ok(_cli([*args, "--output-dir", run], tiny))
    history = [json.loads(line) for line in (run / "metrics_history.jsonl").read_text().splitlines()]
    assert [(r["phase"], r["step"], r["global_step"], r["images"]) for r in history] == [("real", 2, 2, 1), ("real", 4, 4, 1)]
    assert all(0 <= r["mIoU"] <= 1 and r["loss"] > 0 and r["lr"] >= 0 for r in history)
    best = json.loads((run / "model-best/best.json").read_text())
    assert best["mIoU"] == max(r["mIoU"] for r in history) and best["metric"] == "mIoU"
    assert (run / "model-best/config.json").is_file() and (run / "model/config.json").is_file()  # best beside the last
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["best"]["step"] == best["step"] and metrics["history"].endswith("metrics_history.jsonl")
    events = EventAccumulator(str(next((run / "train_seg").rglob("events.out.tfevents.*")).parent)).Reload()
    assert {"loss", "lr", "val/mIoU"} <= set(events.Tags()["scalars"])
    assert [e.step for e in events.Scalars("val/mIoU")] == [2, 4]


def test_eval_samples_needs_eval_every(tmp_path):
    result = _cli(["--eval-samples", "8", "--output-dir", tmp_path])
    assert result.exit_code == 2 and "--eval-samples sets the size of the periodic evaluation: pass --eval-every N" in result.output


def test_a_kill_between_the_best_models_renames_brings_the_previous_best_back(tmp_path):
    from common.seg.validation import Validator

    old = tmp_path / ".partial-old-model-best"  # _save_best renamed the old best away, the kill came before the new one's rename
    old.mkdir()
    (old / "best.json").write_text(json.dumps({"global_step": 4, "mIoU": 0.3, "metric": "mIoU"}))
    (tmp_path / ".partial-model-best").mkdir()  # the new one, never renamed in
    acc = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    a = SimpleNamespace(eval_samples=None, eval_every=2, task="semantic", data_root=ADE_ROOT)
    v = Validator(a, acc, [], None, tmp_path)
    assert v.best["global_step"] == 4 and (tmp_path / "model-best/best.json").is_file() and not old.exists()


def test_eval_only_never_replaces_a_training_runs_metrics(tiny, tmp_path):
    """--eval-only without --output-dir writes beside the checkpoint (eval-NAME/), not into runs/seg-DATA-STRATEGY
    (a training run's folder); pointed at a training run's folder, it refuses."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.json").write_text(json.dumps({"data": "ade20k", "strategy": "aug", "single_scale": {"mIoU": 0.4}}))
    before = (run / "metrics.json").read_bytes()
    r = _cli(["--eval-only", "--checkpoint", tiny, "--data-root", ADE_ROOT, "--eval-size", "64", "--output-dir", run])
    assert r.exit_code == 2 and "holds a training run's metrics" in " ".join(r.output.split()), r.output
    assert (run / "metrics.json").read_bytes() == before
    copy = tmp_path / "models" / "model"
    shutil.copytree(tiny, copy)
    _ok(_cli(["--eval-only", "--checkpoint", copy, "--data-root", ADE_ROOT, "--eval-size", "64"]))
    assert json.loads((tmp_path / "models/eval-model/metrics.json").read_text())["checkpoint"] == str(copy)
    _ok(_cli(["--eval-only", "--checkpoint", copy, "--data-root", ADE_ROOT, "--eval-size", "64"]))  # an evaluation may be redone


def test_a_run_replays_from_its_options_json(tmp_path):
    """--config RUN/options.json repeats a run (the same weights, the same metrics); a flag given beside it wins."""
    first = ["--data-root", ADE_ROOT, "--strategy", "real", "--max-steps", "3", "--seed", "3", "--checkpoint-every", "0", *HRNET]
    _ok(_cli([*first, "--output-dir", tmp_path / "a"]))
    _ok(_cli(["--config", tmp_path / "a/options.json", "--output-dir", tmp_path / "b"]))
    a, b = hrnet.load(tmp_path / "a/model").state_dict(), hrnet.load(tmp_path / "b/model").state_dict()
    assert all(torch.equal(v, b[k]) for k, v in a.items())
    metrics = [json.loads((tmp_path / f"{r}/metrics.json").read_text())["single_scale"]["mIoU"] for r in "ab"]
    assert metrics[0] == metrics[1]
    _ok(_cli(["--config", tmp_path / "a/options.json", "--max-steps", "1", "--output-dir", tmp_path / "c"]))
    assert json.loads((tmp_path / "c/options.json").read_text())["max_steps"] == 1  # the command line wins
    assert json.loads((tmp_path / "c/options.json").read_text())["seed"] == 3  # the record gives the rest
    r = _cli(["--config", tmp_path / "nope.json", "--output-dir", tmp_path / "d"])
    said = " ".join(re.sub(r"[│╭╮╰╯─]", " ", r.output).split())  # the error box, unwrapped
    assert r.exit_code == 2 and "'--config'" in said and "not a run's options.json" in said, r.output
