"""common/seg/quality.py and quality.py: per-sample alignment figures, FreeMask's noisy-region filter and
hardness resampling, and the command end to end with a tiny HRNet on a synthetic folder made from the
real ADE20K samples (downscaled, so that a CPU run takes seconds)."""

import json
import shutil

import numpy as np
import pytest
import torch
import typer
from PIL import Image

import quality
from common import SegGenError
from common.seg import hrnet
from common.seg import labels, quality as q
from common.data.datasets import read_dataset, read_synthetic
from common.data.manifest import ManifestWriter, read_manifest
from conftest import ADE_ROOT, invoke


def one_hot_scores(label: np.ndarray, classes: int = 4) -> torch.Tensor:
    """Logits that predict `label` exactly (ignored pixels predicted as class 0)."""
    lab = torch.as_tensor(np.where(label == 255, 0, label)).long()
    return torch.nn.functional.one_hot(lab, classes).permute(2, 0, 1).float() * 20


# ---------------------------------------------------------------- per-sample figures

def test_perfect_prediction_on_a_real_label():
    label = labels.load_train_label(read_dataset("ade20k", ADE_ROOT, "val")[0], "ade20k")
    figures, loss = q.sample_figures(one_hot_scores(label, 150), label)
    assert figures["miou"] == 1.0 and figures["accuracy"] == 1.0
    assert figures["pixels"] == int((label != 255).sum())
    assert {int(k): n for k, (_, n) in figures["loss"].items()} == {int(c): int((label == c).sum()) for c in np.unique(label) if c != 255}
    assert float(loss.max()) < 1e-6 and loss.shape == label.shape


def test_known_mismatch_gives_the_exact_values():
    label = np.array([[0, 0, 1, 1], [0, 0, 1, 255]])
    pred = np.array([[0, 0, 1, 0], [0, 0, 0, 2]])  # (0, 3) and (1, 2) wrong; (1, 3) is ignored
    figures, loss = q.sample_figures(one_hot_scores(pred, 3), label)
    # class 0: ∩ 4, ∪ 4 + 6 - 4 = 6; class 1: ∩ 1, ∪ 3 + 1 - 1 = 3; class 2 only predicted on an ignored pixel
    assert figures["miou"] == pytest.approx((4 / 6 + 1 / 3) / 2)
    assert figures["accuracy"] == pytest.approx(5 / 7)
    assert figures["iou"] == {"0": [4, 6], "1": [1, 3]}
    wrong = np.log(np.exp(20) + 2)  # -log softmax of a 0 logit among logits (20, 0, 0)
    assert figures["loss"]["1"][0] == pytest.approx(2 * wrong / 3, rel=1e-5) and figures["loss"]["1"][1] == 3
    assert loss[1, 3] == 0 and loss[0, 3] == pytest.approx(wrong, rel=1e-5)


def test_mask2former_scores_are_normalised_over_classes():
    scores = torch.tensor([[[3.0]], [[1.0]]])  # class 0: 0.75 of the mass
    figures, loss = q.sample_figures(scores, np.array([[1]]), kind="scores")
    assert float(loss[0, 0]) == pytest.approx(-np.log(0.25)) and figures["miou"] == 0.0


# ---------------------------------------------------------------- FreeMask: filtering

def test_filter_ignores_pixels_above_tolerance_times_class_mean(tmp_path):
    sample = read_dataset("ade20k", ADE_ROOT, "val")[0]
    original = sample.annotation.read_bytes()
    label = labels.load_train_label(sample, "ade20k")
    c = int(np.bincount(label[label != 255]).argmax())  # the largest class
    means = np.full(150, np.nan)
    means[c] = 1.0
    loss = np.zeros(label.shape, np.float32)
    ys, xs = np.nonzero(label == c)
    loss[ys[0], xs[0]], loss[ys[1], xs[1]], loss[ys[2], xs[2]] = 1.3, 1.25, 1.2  # above, at, below 1.25 × 1
    loss[label != c] = 99.0  # classes without a mean are kept whole
    noisy = q.noisy_pixels(loss, label, means, tolerance=1.25)
    assert np.argwhere(noisy).tolist() == [[ys[0], xs[0]]]
    dst = q.filtered_path(tmp_path, sample)
    q.write_filtered(sample, noisy, dst)
    assert dst == tmp_path / "annotations_filtered" / sample.annotation.name
    before, after = np.asarray(Image.open(sample.annotation)), np.asarray(Image.open(dst))
    assert after[ys[0], xs[0]] == 0 and before[ys[0], xs[0]] == c + 1  # ADE20K: 0 = "other", ignored
    assert np.array_equal(np.delete(after.ravel(), ys[0] * label.shape[1] + xs[0]), np.delete(before.ravel(), ys[0] * label.shape[1] + xs[0]))
    assert sample.annotation.read_bytes() == original
    with pytest.raises(SegGenError, match="must not replace the original"):
        q.write_filtered(sample, noisy, sample.annotation)


def test_class_means_are_pixel_weighted():
    records = [{"loss": {"0": [1.0, 3], "2": [4.0, 1]}}, {"loss": {"0": [3.0, 1]}}]
    means = q.class_means(records, 3)
    assert means[0] == pytest.approx(1.5) and means[2] == 4.0 and np.isnan(means[1])


# ---------------------------------------------------------------- FreeMask: hardness resampling

def test_hardness_is_the_pixel_weighted_class_mean():
    means = np.array([1.0, 3.0, np.nan])
    assert q.hardness({"0": [9.9, 3], "1": [0.1, 1]}, means) == pytest.approx((3 * 1 + 1 * 3) / 4, rel=1e-5)


def test_probabilities_sum_to_one_and_follow_the_hardness_rank():
    hard = [3.0, 1.0, 2.0, 0.5]
    p = q.resample_probabilities(hard)
    assert p.sum() == pytest.approx(1.0)
    assert list(np.argsort(p)) == list(np.argsort(hard))
    # FreeMask's counts for N = 4: min(1 + round((i + 1) / 4 * 20), 20) = 6, 11, 16, 20
    assert p * (6 + 11 + 16 + 20) == pytest.approx([20, 11, 16, 6])


def test_a_shared_mask_splits_its_draws_among_its_images():
    p = q.resample_probabilities([1.0, 1.0, 2.0], groups=["a", "a", "b"], max_repeat=20)
    # mask a (easier): 1 + round(1/2 · 20) = 11 draws over 2 images; mask b: 20
    assert p == pytest.approx(np.array([5.5, 5.5, 20]) / 31)


# ---------------------------------------------------------------- the command

def small_ade20k(root, short=48):
    """A copy of the real ADE20K samples with the short side at `short` (labels resized nearest)."""
    for s in read_dataset("ade20k", ADE_ROOT, "train") + read_dataset("ade20k", ADE_ROOT, "val"):
        rel_img, rel_ann = s.image.relative_to(ADE_ROOT), s.annotation.relative_to(ADE_ROOT)
        im = Image.open(s.image)
        size = (round(im.width * short / min(im.size)), round(im.height * short / min(im.size)))
        for rel, src, how in ((rel_img, s.image, Image.BILINEAR), (rel_ann, s.annotation, Image.NEAREST)):
            (root / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.open(src).resize(size, how).save(root / rel)
    return root


def synthetic_folder(folder, root, per_sample=2, masksyn=False):
    """A synthetic folder as imgsyn.py lays it out (MaskSyn-style lines with off_palette when masksyn)."""
    for d in ("images", "annotations", "colormaps"):
        (folder / d).mkdir(parents=True)
    with ManifestWriter(folder / "manifest.jsonl", ("image", "annotation", "colormap")) as w:
        for s in read_dataset("ade20k", root, "val"):
            for k in range(per_sample):
                sid = f"{s.id}_{k:03d}"
                shutil.copy(s.image, folder / f"images/{sid}.jpg")
                for d in ("annotations", "colormaps"):
                    shutil.copy(s.annotation, folder / f"{d}/{sid}.png")
                rec = {"id": sid, "source_id": s.id, "k": k, "method": "masksyn" if masksyn else "imgsyn",
                       "image": f"images/{sid}.jpg", "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png",
                       "caption": "a room", "seed": k, "models": {}}
                w.append({**rec, "off_palette": 0.01 * (k + 1)} if masksyn else rec)
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("quality")
    torch.manual_seed(0)
    model, _ = hrnet.build("small", 150, "none")
    return {"root": small_ade20k(tmp / "ade"), "seg": hrnet.save(model.eval(), tmp / "seg"), "tmp": tmp}


def cli(argv):
    app = typer.Typer()
    app.command()(quality.main)
    return invoke(app, argv)


def args(folder, setup, *extra):
    return ["--synthetic", str(folder), "--segmenter", str(setup["seg"]), "--data-root", str(setup["root"]), "--size", "32", *extra]


def test_command_writes_figures_summary_and_filtered_annotations_then_resumes(setup):
    folder = synthetic_folder(setup["tmp"] / "masksyn", setup["root"], masksyn=True)
    before = {p.name: p.read_bytes() for p in (folder / "annotations").iterdir()}
    r = cli(args(folder, setup, "--filter", "--tolerance", "1.0", "--worst", "2"))
    assert r.exit_code == 0, r.output
    lines = read_manifest(folder / "quality.jsonl")
    assert sorted(x["id"] for x in lines) == sorted(s.id for s in read_synthetic(folder))
    samples = {s.id: s for s in read_synthetic(folder)}
    seg = quality.load_segmenter(setup["seg"], 150, torch.device("cpu"))
    for line in lines:  # the figures are those of the segmenter's prediction on the sample
        figures, _, _, _ = quality.figures_of(seg, samples[line["id"]], "ade20k", 32)
        assert line["miou"] == pytest.approx(figures["miou"]) and line["loss"].keys() == figures["loss"].keys()
        assert line["off_palette"] == samples[line["id"]].meta["off_palette"]
    summary = json.loads((folder / "quality_summary.json").read_text())
    assert summary["samples"] == 4 and len(summary["worst"]) == 2
    assert summary["alignment"]["mean"] == pytest.approx(np.mean([x["miou"] for x in lines]))
    assert 0 <= summary["class_histogram"]["total_variation"] <= 1
    assert Image.open(folder / "quality_worst.png").height > 0
    # filtered annotations beside the originals, which are untouched
    ref = json.loads((folder / q.REFERENCE_FILE).read_text())
    means = np.array([np.nan if m is None else m for m in ref["class_means"]])
    changed = 0
    for sid, s in samples.items():  # tolerance 1: an untrained net's losses spread about their class means
        _, loss, label, _ = quality.figures_of(seg, s, "ade20k", 32)
        expect = np.asarray(Image.open(s.annotation)).copy()
        expect[q.noisy_pixels(loss, label, means, 1.0)] = 0
        assert np.array_equal(np.asarray(Image.open(q.filtered_path(folder, s))), expect)
        changed += int((expect != np.asarray(Image.open(s.annotation))).sum())
    assert 0 < changed < sum(int((np.asarray(Image.open(s.annotation)) > 0).sum()) for s in samples.values())
    assert {p.name: p.read_bytes() for p in (folder / "annotations").iterdir()} == before
    # train_seg's side: filtered samples and hardness probabilities in read_synthetic's order
    ordered = read_synthetic(folder)
    assert [s.annotation.parent.name for s in q.filtered_samples(folder, ordered)] == ["annotations_filtered"] * 4
    p = q.sampling_probabilities(folder, ordered, 150)
    assert p.shape == (4,) and p.sum() == pytest.approx(1.0)
    # a rerun writes nothing new and no duplicate line
    r = cli(args(folder, setup, "--filter", "--tolerance", "1.0"))
    assert r.exit_code == 0 and "judged 0, skipped 4" in r.output
    assert len(read_manifest(folder / "quality.jsonl")) == 4
    r = cli(args(folder, setup, "--filter", "--tolerance", "2"))
    assert r.exit_code == 2 and "--tolerance" in r.output


def test_folder_reference_filters_against_the_folder_means(setup):
    folder = synthetic_folder(setup["tmp"] / "imgsyn", setup["root"], per_sample=1)
    r = cli(args(folder, setup, "--filter", "--reference", "folder", "--worst", "0"))
    assert r.exit_code == 0, r.output
    assert not (folder / q.REFERENCE_FILE).exists()
    assert all(q.filtered_path(folder, s).is_file() for s in read_synthetic(folder))
    assert "real" in json.loads((folder / "quality_summary.json").read_text())["class_histogram"]


def test_missing_segmenter_names_the_flag(setup, tmp_path):
    folder = synthetic_folder(tmp_path / "s", setup["root"], per_sample=1)
    r = cli(args(folder, setup)[:2] + ["--segmenter", str(tmp_path / "nope"), "--data-root", str(setup["root"])])
    assert r.exit_code == 2 and "--segmenter" in r.output and "nope" in r.output
    assert not (folder / "quality.jsonl").exists()


def test_missing_quality_file_is_named_for_train_seg(tmp_path, setup):
    folder = synthetic_folder(tmp_path / "s", setup["root"], per_sample=1)
    with pytest.raises(SegGenError, match="run quality.py --synthetic"):
        q.sampling_probabilities(folder, read_synthetic(folder), 150)
    with pytest.raises(SegGenError, match="--filter"):
        q.filtered_samples(folder, read_synthetic(folder))


def test_two_processes_judge_disjoint_halves_with_the_same_figures(setup, tmp_path):
    """Two torchrun processes are two independent tasks (no process group): each writes quality.rank{N}.jsonl for
    every other sample and its share of the real split's class losses, and waits for nobody; the same command
    once as one task then writes the summary. The union and the class means are those of a one-process run."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    one = synthetic_folder(tmp_path / "one", setup["root"])
    two = synthetic_folder(tmp_path / "two", setup["root"])
    assert cli(args(one, setup, "--worst", "0")).exit_code == 0
    root = Path(quality.__file__).parent
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(root / "quality.py"),
           *args(two, setup, "--worst", "0")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    ranks = [[json.loads(x)["id"] for x in (two / f"quality.rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    assert len(ranks[0]) == len(ranks[1]) == 2 and not set(ranks[0]) & set(ranks[1])
    assert sorted(p.name for p in two.glob("quality_reference.part*")) == ["quality_reference.part0-of-2.json",
                                                                           "quality_reference.part1-of-2.json"]
    assert not (two / "quality_summary.json").exists() and "without --shard" in " ".join(proc.stderr.split())
    assert cli(args(two, setup, "--worst", "0")).exit_code == 0  # one task: nothing judged again, the summary written
    a = {r["id"]: r for r in read_manifest(one / "quality.jsonl")}
    b = {r["id"]: r for r in read_manifest(two / "quality.jsonl")}
    assert a.keys() == b.keys() and all(a[k]["miou"] == pytest.approx(b[k]["miou"]) for k in a)
    ref = [json.loads((f / q.REFERENCE_FILE).read_text())["class_means"] for f in (one, two)]
    assert [m is None for m in ref[0]] == [m is None for m in ref[1]]
    assert [m for m in ref[0] if m is not None] == pytest.approx([m for m in ref[1] if m is not None], rel=1e-5)
    assert json.loads((two / "quality_summary.json").read_text())["samples"] == 4


def test_a_mask2former_model_folder_is_judged_too(setup, tmp_path, tiny_models):
    folder = synthetic_folder(tmp_path / "s", setup["root"], per_sample=1)
    m2f = tiny_models("mask2former")
    assert quality.load_segmenter(m2f, 150, torch.device("cpu")).kind == "mask2former"
    r = cli(["--synthetic", str(folder), "--segmenter", str(m2f), "--data-root", str(setup["root"]), "--size", "32", "--worst", "1"])
    assert r.exit_code == 0, r.output
    lines = read_manifest(folder / "quality.jsonl")
    assert len(lines) == 2 and all(0 <= x["accuracy"] <= 1 and x["settings"]["segmenter"] == str(m2f) for x in lines)


def test_default_size_is_the_segmenter_runs_eval_size(tmp_path):
    from quality import SIZE, eval_size

    run = tmp_path / "seg-run"
    (run / "model").mkdir(parents=True)
    assert eval_size(run / "model", "ade20k") == SIZE == 512 and eval_size(run / "model", "toy") == 64
    (run / "options.json").write_text(json.dumps({"data": "toy", "eval_size": 96}))
    assert eval_size(run / "model", "toy") == 96  # what train_seg recorded wins


def test_the_segmenters_identity_follows_its_bytes_not_its_path(tmp_path, tiny_models):
    """quality.py's resume key (issue 28 item 6): a copy elsewhere is the same segmenter, one retrained in
    place (other weights, same path) is another."""
    from safetensors.torch import load_file, save_file

    src = tiny_models("mask2former")
    copy = tmp_path / "moved" / "model"
    shutil.copytree(src, copy)
    assert q.segmenter_identity(copy) == q.segmenter_identity(src)
    for f in copy.glob("*.safetensors"):
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(f).items()}, f)
    assert q.segmenter_identity(copy) != q.segmenter_identity(src)
