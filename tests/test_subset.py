"""common/subset.py: one seeded subset of real training ids, written once and honoured by train_seg."""

import json

import pytest
from typer.testing import CliRunner

import typer
from common import SegGenError, subset
from common.datasets import read_dataset
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

    from common import segdata

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
