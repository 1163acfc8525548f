"""The toy world (common/toy/world.py) and its pretrained base (common/toy/base.py): determinism, the
ADE20K layout that `--data toy` reads, captions, classes told by shape rather than colour, and a smoke
build of the base that loads like any pipeline folder."""

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
from conftest import ROOT
from PIL import Image

from common import SegGenError
from common.masks.colormap import class_names, palette_for
from common.data.datasets import load_image, load_label, read_dataset
from common.data.manifest import CAPTION_FIELDS, read_manifest
from common.toy.world import MAX_CAPTION, TOY_CLASSES, V, make_caption, render, write_world


def digest(root):
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small world written by the documented command line."""
    root = tmp_path_factory.mktemp("toy") / "world"
    run = subprocess.run([sys.executable, "-m", "common.toy.world", str(root), "--train", "12", "--val", "4", "--seed", "0"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "wrote 12 train + 4 val samples" in run.stderr
    return root


def test_same_seed_same_bytes_other_seed_differs(world, tmp_path):
    write_world(tmp_path / "again", 12, 4, seed=0)
    write_world(tmp_path / "other", 12, 4, seed=1)
    first, again, other = digest(world), digest(tmp_path / "again"), digest(tmp_path / "other")
    assert len(first) == 2 * 16 + 3  # images + annotations, two caption files, classes.json
    assert again == first
    differing = [k for k in first if other[k] != first[k]]
    assert len(differing) >= 32  # every image and label; only classes.json is shared
    # Sample i does not depend on how many were asked for.
    write_world(tmp_path / "fewer", 5, 1, seed=0)
    fewer = digest(tmp_path / "fewer")
    assert fewer["images/training/toy_train_00000004.png"] == first["images/training/toy_train_00000004.png"]


def test_layout_reads_as_data_toy(world):
    train, val = read_dataset("toy", world, "train"), read_dataset("toy", world, "val")
    assert [s.id for s in train] == [f"toy_train_{i:08d}" for i in range(12)]
    assert [s.id for s in val] == [f"toy_val_{i:08d}" for i in range(4)]
    assert train[0].image == world / "images" / "training" / "toy_train_00000000.png"
    values = set()
    for s in train + val:
        label = load_label(s, "toy")  # checks the values against the toy class table
        assert label.dtype == np.uint8 and label.shape == (64, 64)
        assert Image.open(s.annotation).mode == "L"
        assert load_image(s.image).size == (64, 64)
        values |= set(np.unique(label).tolist())
    assert values <= set(range(1, len(TOY_CLASSES) + 1)) and len(values) >= 6
    table = json.loads((world / "classes.json").read_text())
    assert table["classes"] == TOY_CLASSES and table["ignore_value_in_png"] == 0
    assert class_names("toy") == {c["png_value"]: c["name"] for c in TOY_CLASSES}
    pal = palette_for("toy")
    assert sorted(pal.values.tolist()) == list(range(len(TOY_CLASSES) + 1)) and pal.min_distance() >= 51


def test_captions_file_as_caption_py_writes_it(world):
    from common.diffusion.training import read_captions

    for split in ("train", "val"):
        path = world / f"captions_{split}.jsonl"
        records = read_manifest(path, CAPTION_FIELDS, path_fields=("image",))
        samples = read_dataset("toy", world, split)
        assert [r["id"] for r in records] == [s.id for s in samples]
        for r, s in zip(records, samples):
            assert set(r) == {"id", "image", "caption", "captioner", "prompt", "model"} and r["captioner"] == "toyworld"
            assert world / r["image"] == s.image
            assert 0 < len(r["caption"]) <= MAX_CAPTION
        kept, texts = read_captions(path, samples)  # what the trainers' --captions reads
        assert len(kept) == len(samples)


def test_captions_name_what_is_visible():
    assert make_caption([("ball", "red"), ("tree", None), ("tree", None)], ["grass"], "under a sky") == \
        "a red ball and two trees on grass under a sky"
    assert make_caption([("box", "orange")], ["sand", "road"], "in front of a wall") == "an orange box on sand and a road in front of a wall"
    assert make_caption([], ["water"], "under a sky") == "water under a sky"
    long = make_caption([("car", "purple"), ("box", "yellow"), ("ball", "orange"), ("figure", None)], ["grass", "road"], "by a wall under a sky")
    assert len(long) <= MAX_CAPTION and long.endswith("on grass and a road by a wall under a sky")


def test_thing_classes_are_not_told_by_colour():
    """Each thing class appears in many colours, and a nearest-mean-colour rule labels thing pixels poorly."""
    rng_seeds = range(150)
    pixels, classes = [], []
    names = {"ball": set(), "box": set(), "car": set()}
    for seed in rng_seeds:
        image, label, caption = render(np.random.default_rng([7, seed]))
        for kind in ("ball", "box", "tree", "car", "figure"):
            m = label == V[kind]
            pixels.append(image[m].astype(np.float32))
            classes.append(np.full(m.sum(), V[kind]))
        words = caption.split(" on ")[0].replace(",", "").split()
        for prev, word in zip(words, words[1:]):
            kind = word.rstrip("es") if word.startswith("box") else word.rstrip("s")
            if kind in names and prev not in ("a", "an", "two", "three", "four"):
                names[kind].add(prev)
    assert all(len(v) >= 4 for v in names.values()), names  # e.g. red, blue, green, yellow balls
    x, y = np.concatenate(pixels), np.concatenate(classes)
    kinds = np.unique(y)
    assert len(kinds) == 5
    means = np.stack([x[y == k].mean(0) for k in kinds])
    nearest = kinds[np.argmin(((x[:, None] - means[None]) ** 2).sum(-1), 1)]
    balanced = np.mean([(nearest[y == k] == k).mean() for k in kinds])  # class-balanced accuracy, chance = 0.2
    assert balanced < 0.5


def test_rerun_replaces_and_foreign_folder_is_refused(tmp_path):
    write_world(tmp_path / "w", 6, 2, seed=0)
    write_world(tmp_path / "w", 3, 1, seed=0)
    assert len(read_dataset("toy", tmp_path / "w", "train")) == 3
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(SegGenError, match="is not a toy world"):
        write_world(tmp_path / "mine", 2, 1, seed=0)
    with pytest.raises(SegGenError, match=r"no toy world found; make one with `python -m common.toy.world"):
        read_dataset("toy", tmp_path / "nothing", "train")


def test_toybase_quick_build_loads_as_a_pipeline(world, tmp_path):
    import torch
    from diffusers import StableDiffusionXLPipeline

    from common.toy.base import BaseConfig, build, load_world, sample
    from common.diffusion.sdxl import inspect_base

    out = tmp_path / "base"
    record = build(out, world, BaseConfig.quick())
    info = inspect_base(str(out))
    assert info.is_sdxl and info.vae_factor == 8
    pipe = StableDiffusionXLPipeline.from_pretrained(out)
    assert pipe.vae.config.scaling_factor == pytest.approx(record["vae_scaling_factor"]) and record["vae_scaling_factor"] != 1.0
    assert set(record["vae_reconstruction_val"]) == {"mae_255", "psnr_db"}
    maps = record["vae_colormaps_val"]  # the generation-palette maps of the val split through the VAE
    assert set(maps) == {"psnr_db", "class_right", "off_palette"}
    assert 0 <= maps["class_right"] <= 1 and 0 <= maps["off_palette"] <= 1
    assert set(record["unet_caption_use_val"]) == {"mse_own_captions", "mse_shuffled_captions"}
    assert Image.open(out / "samples.png").size == (64 * 4, 128)  # 4 val images over 4 samples
    images = sample(pipe, ["a red ball on grass under a sky"], steps=2)
    assert images.shape == (1, 64, 64, 3) and images.dtype == np.uint8
    # The saved tokenizers read each caption word as one token; the text encoders are random and frozen,
    # sized to them, and the same seed gives the same weights.
    _, texts = load_world(world, "train")
    for tok in (pipe.tokenizer, pipe.tokenizer_2):
        assert all(len(tok.tokenize(w)) == 1 for t in texts for w in t.replace(",", " ").split())
    assert pipe.text_encoder.config.vocab_size == len(pipe.tokenizer)
    again = build(tmp_path / "again", world, BaseConfig.quick())
    assert again["vae_scaling_factor"] == record["vae_scaling_factor"]
    torch.testing.assert_close(StableDiffusionXLPipeline.from_pretrained(tmp_path / "again").text_encoder.state_dict(),
                               pipe.text_encoder.state_dict())


def test_toybase_with_16_latent_channels_samples_and_the_unet_follows(world, tmp_path):
    """--vae-latent-channels 16 (SD3's and FLUX's choice): the UNet reads and writes 16 channels, the sampler draws
    16-channel noise, and the result is still a pipeline folder; a --vae-width the GroupNorm cannot split is refused."""
    from diffusers import StableDiffusionXLPipeline

    from common.toy.base import BaseConfig, build, sample

    cfg = BaseConfig.quick()
    cfg.vae_latent_channels, cfg.vae_channels = 16, (16, 32, 64, 64)
    build(tmp_path / "base", world, cfg)
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_path / "base")
    assert pipe.vae.config.latent_channels == pipe.unet.config.in_channels == pipe.unet.config.out_channels == 16
    assert sample(pipe, ["a red ball on grass under a sky"], steps=2).shape == (1, 64, 64, 3)
    r = subprocess.run([sys.executable, "-m", "common.toy.base", str(tmp_path / "odd"), "--world", str(world), "--quick",
                        "--vae-width", "9"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "--vae-width must be a multiple of 2" in r.stderr and "Traceback" not in r.stderr


def test_word_tokenizer_one_token_per_word_and_words_added_later_change_nothing_before():
    from common.toy.base import word_tokenizer

    first = word_tokenizer(["a red ball on grass"])
    more = word_tokenizer(["a red ball on grass", "two balls, a box and a road under a sky"])
    assert first.tokenize("a red ball on grass") == ["a</w>", "red</w>", "ball</w>", "on</w>", "grass</w>"]
    assert more.tokenize("two balls, a box") == ["two</w>", "balls</w>", ",</w>", "a</w>", "box</w>"]
    assert more.tokenize("a red ball on grass") == first.tokenize("a red ball on grass")
    assert len(more.tokenize("zebra")) > 1  # an unknown word still tokenizes, in pieces
    assert more("ball").input_ids[0] == more.bos_token_id and more("ball").input_ids[-1] == more.eos_token_id


def test_toybase_without_a_world_names_the_command(tmp_path):
    from common.toy.base import BaseConfig, build

    with pytest.raises(SegGenError, match=r"--world .*python -m common.toy.world"):
        build(tmp_path / "base", tmp_path / "missing", BaseConfig.quick())


def test_toybase_map_roundtrip_scores_what_comes_back(world):
    """The colour-map check of the base's VAE: a lossless round trip reads every pixel back as its class,
    a map painted a class off reads those pixels back wrong."""
    from types import SimpleNamespace

    from common.toy.base import load_maps, map_roundtrip

    maps, labels = load_maps(world, "val")  # (N, 3, 64, 64) in [-1, 1], (N, 64, 64)
    assert maps.shape == (4, 3, 64, 64) and labels.shape == (4, 64, 64)

    class Fake:  # encode -> the input as the posterior mean; decode -> `shift(latents)`
        def __init__(self, shift):
            self.shift = shift

        def encode(self, x):
            return SimpleNamespace(latent_dist=SimpleNamespace(mode=lambda: x))

        def decode(self, z):
            return SimpleNamespace(sample=self.shift(z))

    exact = map_roundtrip(Fake(lambda z: z), maps, labels)
    assert exact["class_right"] == 1.0 and exact["off_palette"] == 0.0 and exact["psnr_db"] > 60
    shifted = maps.clone()
    shifted[:, :, :32] = maps[:1, :, -1:, :1]  # top half (sky) painted the first map's bottom-left (ground) colour
    wrong = map_roundtrip(Fake(lambda z: shifted), maps, labels)
    assert wrong["class_right"] < 1.0 and wrong["off_palette"] == 0.0


# ---------------------------------------------------------------- issue 24: oracle rows, stuff and things apart

def test_oracle_folders_hold_the_real_images_of_imgsyns_labels(world, tmp_path):
    """bench/toy.py oracle: the first --limit training labels in id order (imgsyn.py's choice), with the real
    image (oracle-real) or the image through the shipped base's VAE (oracle-vae), readable as a synthetic folder."""
    from common.data.datasets import read_synthetic

    r = subprocess.run([sys.executable, "bench/toy.py", "oracle", "--world", str(world), "--limit", "3",
                        "--vae", "common/assets/toybase", "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    train = sorted(read_dataset("toy", world, "train"), key=lambda s: s.id)[:3]
    for method in ("oracle-real", "oracle-vae", "oracle-down2"):
        syn = read_synthetic(tmp_path / f"{method}-toy")
        assert [s.meta["source_id"] for s in syn] == [s.id for s in train]
        assert all(s.meta["method"] == method for s in syn)
        for s, real in zip(syn, train):
            assert np.array_equal(load_label(s, "toy"), load_label(real, "toy"))
            err = np.abs(np.asarray(load_image(s.image), int) - np.asarray(load_image(real.image), int)).mean()
            assert err < 8 if method == "oracle-real" else 2 < err < 60  # JPEG only / the VAE's or the resize's blur too


def test_stuff_and_thing_means_from_per_class_iou():
    from common.report.toy import stuff_thing

    iou = {c["name"]: (0.8 if c["is_stuff"] else 0.1) for c in TOY_CLASSES}
    iou["ball"] = None  # absent from the val labels: left out, not counted as 0
    assert stuff_thing(iou) == {"stuff": 80.0, "thing": 10.0}
    assert stuff_thing({"sky": 0.5})["thing"] is None


def test_table4_reads_every_row_kind_and_reports_the_oracle_share(tmp_path):
    from common.report.toy import table4, table4_lines

    names = [c["name"] for c in TOY_CLASSES]
    for row, m in (("real", 0.40), ("imgsyn", 0.42), ("oracle-vae", 0.44), ("oracle-real", 0.46), ("both-p20", 0.41)):
        for seed in (0, 1):
            run = tmp_path / "runs/table4" / f"n50-{row}-s{seed}"
            run.mkdir(parents=True)
            per = {n: m for n in names}
            (run / "metrics.json").write_text(json.dumps({"single_scale": {"mIoU": m, "per_class_iou": per}}))
    rows = table4(tmp_path)
    assert sorted({r["synthetic"] for r in rows}) == ["both-p20", "imgsyn", "oracle-real", "oracle-vae", "real"]
    assert all(r["stuff"] == r["thing"] == r["miou"] for r in rows)
    text = "\n".join(table4_lines(rows, "T"))
    assert "+ oracle-VAE" in text and "+ oracle-real" in text and "both-p20" in text
    assert "+ oracle-VAE (the same through the base's VAE) +4.00 over real only" in text and "+ ImgSyn +50%" in text
    assert "| +4.00 ± 0.00 |" in text  # the paired difference, seed by seed
