"""common/data/subset.py: one seeded subset of real training ids, written once and honoured by every stage (caption, both
generator trainers, masksyn, imgsyn, train_seg)."""

import json

import pytest
from typer.testing import CliRunner

import typer
from common import SegGenError
from common.data import subset
from common.data.datasets import read_dataset
from conftest import ADE_ROOT, invoke


def cli(argv):
    app = typer.Typer()
    app.command()(subset.main)
    return invoke(app, [str(a) for a in argv])


def test_the_command_writes_a_seeded_sorted_choice(tmp_path):
    ids = [s.id for s in read_dataset("ade20k", ADE_ROOT, "val")]
    r = cli(["--data-root", ADE_ROOT, "--split", "val", "--n", "1", "--seed", "3", "--out", tmp_path / "a.txt"])
    assert r.exit_code == 0, r.output
    got = (tmp_path / "a.txt").read_text().split()
    assert got == subset.choose(ids, 1, 3) and got[0] in ids
    cli(["--data-root", ADE_ROOT, "--split", "val", "--n", "1", "--seed", "3", "--out", tmp_path / "b.txt"])
    assert (tmp_path / "b.txt").read_text() == (tmp_path / "a.txt").read_text()  # the same command, the same subset
    many = [f"id{i:03d}" for i in range(100)]
    assert subset.choose(many, 10, 0) == sorted(subset.choose(many, 10, 0)) and subset.choose(many, 10, 0) != subset.choose(many, 10, 1)
    r = cli(["--data-root", ADE_ROOT, "--split", "val", "--n", "5", "--out", tmp_path / "c.txt"])
    assert r.exit_code == 2 and "--n must lie in 1..2" in " ".join(r.output.split())


def test_apply_keeps_the_listed_samples_and_names_unknown_ids(tmp_path):
    samples = read_dataset("ade20k", ADE_ROOT, "val")
    (tmp_path / "ids.txt").write_text(f"{samples[1].id}\n")
    assert [s.id for s in subset.apply(samples, tmp_path / "ids.txt")] == [samples[1].id]
    (tmp_path / "bad.txt").write_text(f"{samples[1].id}\nADE_train_99999999\n")
    with pytest.raises(SegGenError, match=r"--real-subset .*bad.txt: 1 id\(s\) are not in the dataset \(e.g. 'ADE_train_99999999'\)"):
        subset.apply(samples, tmp_path / "bad.txt")
    with pytest.raises(SegGenError, match="--real-subset .*nope.txt: no such file"):
        subset.apply(samples, tmp_path / "nope.txt")
    (tmp_path / "bom.txt").write_bytes(f"\ufeff{samples[1].id}\r\n{samples[0].id}\r\n".encode())  # as Windows editors save it
    assert [s.id for s in subset.apply(samples, tmp_path / "bom.txt")] == [samples[0].id, samples[1].id]


def test_train_seg_trains_on_the_subset_only(tmp_path, tiny_models):
    import train_seg

    real = read_dataset("ade20k", ADE_ROOT, "val")
    root = ADE_ROOT  # train split: 1 image; the subset must name it
    train = read_dataset("ade20k", root, "train")
    (tmp_path / "ids.txt").write_text(f"{train[0].id}\n")
    args = ["--data-root", root, "--strategy", "real", "--max-steps", "2", "--model", tiny_models("mask2former"), "--batch-size", "2",
            "--crop", "64", "--num-workers", "0", "--checkpoint-every", "0", "--eval-size", "32"]
    r = CliRunner().invoke(train_seg.app, [str(a) for a in [*args, "--real-subset", tmp_path / "ids.txt", "--output-dir", tmp_path / "run"]])
    assert r.exit_code == 0, r.output
    opts = json.loads((tmp_path / "run/options.json").read_text())
    assert opts["real_subset"] == str(tmp_path / "ids.txt")
    (tmp_path / "val_ids.txt").write_text(f"{real[0].id}\n")  # a validation id is not a training sample
    r = CliRunner().invoke(train_seg.app, [str(a) for a in [*args, "--real-subset", tmp_path / "val_ids.txt", "--output-dir", tmp_path / "run2"]])
    assert r.exit_code == 2 and "--real-subset" in r.output and real[0].id in r.output


def test_read_sources_keeps_only_the_subset_of_the_training_split(tmp_path):
    import shutil
    from types import SimpleNamespace

    from common.seg import data as segdata

    src = ADE_ROOT / "ADEChallengeData2016"
    root = tmp_path / "ADEChallengeData2016"
    for kind in ("images", "annotations"):  # a training split of all 3 real samples
        (root / kind / "training").mkdir(parents=True)
        for f in src.glob(f"{kind}/*/*"):
            shutil.copy(f, root / kind / "training" / f.name)
    train = read_dataset("ade20k", tmp_path, "train")
    assert len(train) == 3
    (tmp_path / "ids.txt").write_text(f"{train[2].id}\n{train[0].id}\n")
    a = SimpleNamespace(strategy="real", data="ade20k", data_root=tmp_path, real_subset=tmp_path / "ids.txt", max_real_samples=None, synthetic=[])
    real, _, _ = segdata.read_sources(a, print)
    assert [s.id for s in real] == [train[0].id, train[2].id]


# ---------------------------------------------------------------- the other stages honour the same file

VAL = [s.id for s in read_dataset("ade20k", ADE_ROOT, "val")]  # the two real ADE20K val samples


@pytest.fixture
def one_id(tmp_path):
    """A subset of the second val sample only (the first would pass a first-N cut by accident)."""
    path = tmp_path / "ids.txt"
    path.write_text(f"{VAL[1]}\n")
    return path


def val_captions(path):
    with open(path, "w") as f:
        for s in read_dataset("ade20k", ADE_ROOT, "val"):
            f.write(json.dumps({"id": s.id, "image": s.image.relative_to(ADE_ROOT).as_posix(), "caption": f"a photo of {s.id}"}) + "\n")
    return path


def test_caption_writes_the_subset_only(tmp_path, one_id):
    from caption import caption
    from common.data.manifest import CAPTION_FIELDS, read_manifest

    s = caption("ade20k", ADE_ROOT, "val", tmp_path / "caps.jsonl", captioner="labels", real_subset=one_id)
    assert s["captioned"] == 1 and [r["id"] for r in read_manifest(tmp_path / "caps.jsonl", CAPTION_FIELDS)] == [VAL[1]]
    (tmp_path / "train_ids.txt").write_text("ADE_train_00000001\n")  # a train id, captioning val
    with pytest.raises(SegGenError, match=r"--real-subset .*train_ids.txt: 1 id\(s\) are not in the dataset"):
        caption("ade20k", ADE_ROOT, "val", tmp_path / "caps2.jsonl", captioner="labels", real_subset=tmp_path / "train_ids.txt")


@pytest.mark.parametrize("trainer", ["train_text2mask", "train_mask2img"])
def test_generator_trainers_build_their_dataset_from_the_subset(tmp_path, tiny_models, monkeypatch, one_id, trainer):
    import importlib

    from conftest import trainer_args

    module = importlib.import_module(trainer)
    built = []
    real_dataset = module.ColorMapDataset

    def spy(samples, *args, **kw):
        built.append([s.id for s in samples])
        return real_dataset(samples, *args, **kw)

    monkeypatch.setattr(module, "ColorMapDataset", spy)
    base = tiny_models("sdxl")
    r = invoke(module.app, trainer_args(tmp_path, base, tmp_path / "run", **{"--max-steps": 1, "--real-subset": one_id}))
    assert r.exit_code == 0, r.output
    assert built[0] == [VAL[1]]  # the captions hold both val samples; the trainer took the subset's one
    assert json.loads((tmp_path / "run/options.json").read_text())["samples"] == 1
    (tmp_path / "more.txt").write_text(f"{VAL[1]}\nADE_val_00000009\n")  # an id without a caption
    r = invoke(module.app, trainer_args(tmp_path, base, tmp_path / "run2", **{"--max-steps": 1, "--real-subset": tmp_path / "more.txt"}))
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "--real-subset" in out and "have no caption" in out and "ADE_val_00000009" in out


def test_masksyn_draws_from_the_subset_captions_only(tmp_path, tiny_models, one_id):
    import masksyn
    from common.data.datasets import read_synthetic

    s = masksyn.masksyn(captions=val_captions(tmp_path / "caps.jsonl"), real_subset=one_id, per_sample=1, batch_size=2,
                        out=tmp_path / "ms", text2mask=str(tiny_models("sdxl")), mask2img=str(tiny_models("controlnet")),
                        base=str(tiny_models("sdxl")), text2mask_steps=1, mask2img_steps=1, resolution=64, max_off_palette=1.0)
    assert s["written"] == 1
    assert [x.meta["source_id"] for x in read_synthetic(tmp_path / "ms")] == [VAL[1]]


def test_imgsyn_draws_from_the_subset_sources_only(tmp_path, tiny_models, one_id):
    import imgsyn
    from common.data.datasets import read_synthetic

    caps = val_captions(tmp_path / "caps.jsonl")
    kw = dict(data="ade20k", data_root=ADE_ROOT, split="val", captions=caps, per_sample=1, batch_size=2, steps=1, resolution=64,
              mask2img=str(tiny_models("controlnet")), base=str(tiny_models("sdxl")))
    s = imgsyn.imgsyn(real_subset=one_id, out=tmp_path / "is", **kw)
    assert s["written"] == 1
    assert [x.meta["source_id"] for x in read_synthetic(tmp_path / "is")] == [VAL[1]]
    (tmp_path / "none.txt").write_text("ADE_val_00000009\n")
    with pytest.raises(SegGenError, match=r"--real-subset .*none.txt: 1 of its 1 id\(s\) have no caption in --captions"):
        imgsyn.imgsyn(real_subset=tmp_path / "none.txt", out=tmp_path / "is2", **kw)


@pytest.mark.parametrize("script", ["caption", "masksyn", "imgsyn"])
def test_every_stage_cli_names_a_missing_subset_file(tmp_path, script):
    import importlib

    module = importlib.import_module(script)
    caps = val_captions(tmp_path / "caps.jsonl")
    args = {"caption": ["--data-root", ADE_ROOT, "--split", "val", "--captioner", "labels", "--out", tmp_path / "out.jsonl"],
            "masksyn": ["--captions", caps, "--out", tmp_path / "out"],
            "imgsyn": ["--data-root", ADE_ROOT, "--split", "val", "--captions", caps, "--out", tmp_path / "out"]}[script]
    r = cli_of(module.main, [*args, "--real-subset", tmp_path / "nope.txt"])
    out = " ".join(r.output.split())
    assert r.exit_code == 2 and "--real-subset" in out and "nope.txt: no such file" in out and "common.data.subset" in out


def cli_of(main, argv):
    app = typer.Typer()
    app.command()(main)
    return invoke(app, [str(a) for a in argv])
