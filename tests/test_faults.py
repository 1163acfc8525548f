"""The fault catalogue (issue 16): bad inputs a careful or careless user gives each stage, each run through
the stage's command line in-process. Every case asserts the exit code (2: a wrong flag, layout or model,
stopped before any work; 1: per-item failures reported and the rest done), that the message names the
file or flag, that no Python traceback reaches the user, and, on an existing output, that nothing already
written was lost or duplicated.

A case is a function `case_NAME(w, tmp) -> Case`, registered with @case(stage); `w` is the module's shared
world (tiny models, captions, a data root), `tmp` the case's own folder.
"""

from __future__ import annotations

import builtins
import errno
import json
import os
import re
import shutil
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import typer
from conftest import ADE_ROOT, TRAIN_CAPTIONS, write_captions
from PIL import Image
from typer.testing import CliRunner

import caption
import imgsyn
import masksyn
import quality
import train_mask2img
import train_seg
import train_text2mask
from common.runtime.lock import output_lock

STAGES = {"caption": caption, "imgsyn": imgsyn, "masksyn": masksyn, "train_text2mask": train_text2mask,
          "train_mask2img": train_mask2img, "train_seg": train_seg, "quality": quality}
VAL = ["ADE_val_00000001", "ADE_val_00000002"]


@dataclass
class Case:
    args: list  # the command line (paths as Path are fine)
    code: int  # expected exit code
    names: list[str]  # what the message must name (a file, a flag), each as a plain substring
    out: Path | None = None  # an existing output whose files must survive unchanged
    patches: list = field(default_factory=list)  # (object, attribute, value) set for the run only
    after: object = None  # a check of the result: after(output_text) -> None
    grows: bool = False  # out may gain complete lines (a write that failed after its data landed), never lose any
    hold: tuple | None = None  # (output, file?) whose lock another job holds during the run


CASES: dict[str, tuple[str, object]] = {}


def case(stage):
    def register(fn):
        CASES[fn.__name__.removeprefix("case_")] = (stage, fn)
        return fn
    return register


# Cases that fail today for want of a fix in a stage script or a module outside this test's reach: not in
# the test parametrisation (no failing or skipped test), but counted by `python tests/test_faults.py`,
# which runs the whole catalogue and prints clear / traceback / silent / lost. `fix` says what to change.
PENDING: dict[str, tuple[str, object, str]] = {}


def pending(stage, fix):
    def register(fn):
        PENDING[fn.__name__.removeprefix("case_")] = (stage, fn, fix)
        return fn
    return register


# ---------------------------------------------------------------- the shared world

@pytest.fixture(scope="module")
def w(tiny_models, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    sdxl = tiny_models("sdxl")
    return {"tmp": tmp, "sdxl": sdxl, "controlnet": tiny_models("controlnet"), "blip2": tiny_models("blip2"),
            "captions": write_captions(tmp / "captions.jsonl"), "mask2former": tiny_models("mask2former")}


def data_root(tmp: Path) -> Path:
    """A private copy of the real ADE20K samples (writable, so a case can break one file)."""
    root = tmp / "ade"
    shutil.copytree(ADE_ROOT, root)
    for p in root.rglob("*"):
        p.chmod(0o755 if p.is_dir() else 0o644)
    return root


def val_file(root: Path, sid: str, kind: str = "annotations") -> Path:
    return root / f"ADEChallengeData2016/{kind}/validation/{sid}.{'png' if kind == 'annotations' else 'jpg'}"


def bomb_png(path: Path, size=(30000, 30000)) -> None:
    """A 1x1 PNG whose header claims `size`: PIL refuses it at open with DecompressionBombError."""
    raw = bytearray()
    Image.new("L", (1, 1)).save(buf := path.with_suffix(".tmp.png"))
    raw = bytearray(buf.read_bytes())
    buf.unlink()
    ihdr = raw.index(b"IHDR")
    raw[ihdr + 4:ihdr + 12] = struct.pack(">II", *size)
    raw[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(raw[ihdr:ihdr + 17])))
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: int = 1500) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def snapshot(folder: Path) -> dict:
    """Every file under an output and its bytes (lock files aside: they are the lock's, not the user's)."""
    if folder is None or not folder.exists():
        return {}
    if folder.is_file():
        return {folder.name: folder.read_bytes()}
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and ".lock." not in p.name}


def fail_writes_under(folder: Path, err: int):
    """Patches that make every write under `folder` fail with `err` (ENOSPC: disk full, EROFS: read-only):
    opening a file there for writing, fsync of a file there, and os.open with a write flag."""
    folder = str(Path(folder).resolve())

    def under(p) -> bool:
        try:
            return str(Path(os.fsdecode(p)).resolve()).startswith(folder)
        except (TypeError, ValueError):
            return False

    real_open, real_os_open, real_fsync = builtins.open, os.open, os.fsync

    def bad_open(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+") and under(file):
            raise OSError(err, os.strerror(err), os.fsdecode(file))
        return real_open(file, mode, *a, **k)

    def bad_os_open(path, flags, *a, **k):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and under(path) and (err == errno.EROFS or ".lock." not in os.fsdecode(path)):
            raise OSError(err, os.strerror(err), os.fsdecode(path))
        return real_os_open(path, flags, *a, **k)

    def bad_fsync(fd):
        try:
            target = os.readlink(f"/proc/self/fd/{fd if isinstance(fd, int) else fd.fileno()}")
        except OSError:
            target = ""
        if under(target) and ".lock." not in target:
            raise OSError(err, os.strerror(err))
        return real_fsync(fd)

    patches = [(os, "fsync", bad_fsync), (os, "open", bad_os_open)]
    if err == errno.EROFS:
        patches.append((builtins, "open", bad_open))
    return patches


# ---------------------------------------------------------------- the stages' command lines

def cap_args(root, out, *extra, blip2=None):
    base = ["--data", "ade20k", "--data-root", root, "--split", "val", "--out", out, "--num-workers", "0"]
    if blip2 is None:
        return [*base, "--captioner", "labels", *extra]
    return [*base, "--model", blip2, "--max-new-tokens", "3", "--batch-size", "1", *extra]


def img_args(w, out, *extra, root=ADE_ROOT, captions=None, mask2img=None):
    return ["--data-root", root, "--split", "val", "--captions", captions or w["captions"], "--mask2img", mask2img or w["controlnet"],
            "--base", w["sdxl"], "--per-sample", "1", "--batch-size", "1", "--steps", "1", "--resolution", "64", "--out", out, *extra]


def ms_args(w, out, *extra, captions=None, text2mask=None):
    return ["--captions", captions or w["captions"], "--text2mask", text2mask or w["sdxl"], "--mask2img", w["controlnet"],
            "--base", w["sdxl"], "--per-sample", "1", "--batch-size", "1", "--text2mask-steps", "1", "--mask2img-steps", "1",
            "--resolution", "64", "--max-off-palette", "1.0", "--out", out, *extra]


def trainer(w, out, *extra, root=ADE_ROOT, captions=None, pretrained=None):
    return ["--data-root", root, "--split", "val", "--captions", captions or w["captions"], "--pretrained", pretrained or w["sdxl"],
            "--output-dir", out, "--resolution", "64", "--batch-size", "2", "--num-workers", "0", "--max-steps", "1",
            "--validation-steps", "0", "--checkpointing-steps", "0", "--report-to", "none", *extra]


def seg_args(w, out, *extra, root=ADE_ROOT):
    return ["--data-root", root, "--model", w["mask2former"], "--batch-size", "2", "--crop", "64", "--num-workers", "0",
            "--checkpoint-every", "0", "--max-steps", "1", "--eval-size", "32", "--output-dir", out, *extra]


def synthetic(folder: Path, n=1) -> Path:
    """A synthetic folder as imgsyn.py lays it out, from the real val samples."""
    from common.data.datasets import read_dataset
    from common.data.manifest import ManifestWriter

    for d in ("images", "annotations", "colormaps"):
        (folder / d).mkdir(parents=True)
    with ManifestWriter(folder / "manifest.jsonl", ("image", "annotation", "colormap")) as wr:
        for s in read_dataset("ade20k", ADE_ROOT, "val"):
            for k in range(n):
                sid = f"{s.id}_{k:03d}"
                shutil.copy(s.image, folder / f"images/{sid}.jpg")
                for d in ("annotations", "colormaps"):
                    shutil.copy(s.annotation, folder / f"{d}/{sid}.png")
                wr.append({"id": sid, "source_id": s.id, "k": k, "method": "imgsyn", "image": f"images/{sid}.jpg",
                           "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png", "caption": "a room",
                           "seed": k, "models": {}})
    for p in folder.rglob("*"):
        if p.is_file():
            p.chmod(0o644)
    return folder


def q_args(w, folder, *extra, segmenter=None):
    return ["--synthetic", folder, "--segmenter", segmenter or w["mask2former"], "--data-root", ADE_ROOT, "--split", "val",
            "--size", "32", *extra]


def captions_file(tmp: Path, lines: list) -> Path:
    """A captions manifest with the given lines (dicts are dumped, bytes written as they are)."""
    path = tmp / "captions.jsonl"
    with open(path, "wb") as f:
        for line in lines:
            f.write(line if isinstance(line, bytes) else (json.dumps(line) + "\n").encode())
    return path


def cap_line(sid, text="a room"):
    return {"id": sid, "image": f"ADEChallengeData2016/images/validation/{sid}.jpg", "caption": text}


def pickle_only(src: Path, dst: Path) -> Path:
    """A copy of a diffusers folder whose weights are pickles (torch.save) instead of safetensors."""
    import torch
    from safetensors.torch import load_file

    shutil.copytree(src, dst)
    for st in dst.rglob("*.safetensors"):
        name = "pytorch_model.bin" if st.name == "model.safetensors" else st.name.replace(".safetensors", ".bin")
        torch.save(load_file(st), st.with_name(name))
        st.unlink()
    return dst


def bad_palette(src: Path, dst: Path, how: str) -> Path:
    shutil.copytree(src, dst)
    from common.masks.colormap import palette_for

    d = palette_for("ade20k", "generation").to_dict()
    if how == "duplicate":
        d["colors"][2] = d["colors"][1]
    else:  # wrong count: the last ten classes have no colour
        d["colors"], d["values"] = d["colors"][:-10], d["values"][:-10]
    (dst / "palette.json").write_text(json.dumps(d))
    return dst


# ---------------------------------------------------------------- caption.py

@case("caption")
def case_caption_missing_data_root(w, tmp):
    return Case(cap_args(tmp / "nowhere", tmp / "c.jsonl"), 2, ["nowhere"])


@case("caption")
def case_caption_wrong_layout(w, tmp):
    (tmp / "root/images").mkdir(parents=True)
    return Case(cap_args(tmp / "root", tmp / "c.jsonl"), 2, [str(tmp / "root")])


@case("caption")
def case_caption_out_is_a_folder(w, tmp):
    (tmp / "out.jsonl").mkdir()
    return Case(cap_args(ADE_ROOT, tmp / "out.jsonl"), 2, ["out.jsonl"])


def caption_item(w, tmp, breaks, kind="annotations", blip2=False):
    """One of the two val samples broken; the other is captioned, the broken one is in the errors file."""
    root = data_root(tmp)
    broken = val_file(root, VAL[0], kind)
    breaks(broken)
    out = tmp / "c.jsonl"

    def after(text):
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert [x["id"] for x in lines] == [VAL[1]]
        errors = [json.loads(x) for x in (tmp / "c.errors.jsonl").read_text().splitlines()]
        assert [e["id"] for e in errors] == [VAL[0]] and str(broken) in errors[0]["error"], errors
    # the console says how many failed and where the list is; the list names each file and its error
    return Case(cap_args(root, out, blip2=w["blip2"] if blip2 else None), 1, ["1 image(s) failed", "c.errors.jsonl"], after=after)


@case("caption")
def case_caption_label_truncated(w, tmp):
    return caption_item(w, tmp, truncate)


@case("caption")
def case_caption_label_bomb(w, tmp):
    return caption_item(w, tmp, bomb_png)


@case("caption")
def case_caption_label_wrong_size(w, tmp):
    return caption_item(w, tmp, lambda p: Image.open(p).resize((40, 30), Image.NEAREST).save(p))


@case("caption")
def case_caption_label_out_of_range(w, tmp):
    def breaks(p):
        a = np.asarray(Image.open(p)).copy()
        a[:4, :4] = 200
        Image.fromarray(a).save(p)
    return caption_item(w, tmp, breaks)


@case("caption")
def case_caption_label_rgb(w, tmp):
    return caption_item(w, tmp, lambda p: Image.open(p).convert("RGB").save(p))


@case("caption")
def case_caption_image_truncated(w, tmp):
    return caption_item(w, tmp, truncate, kind="images", blip2=True)


@case("caption")
def case_caption_image_bomb(w, tmp):
    return caption_item(w, tmp, bomb_png, kind="images", blip2=True)


@case("caption")
def case_caption_image_not_an_image(w, tmp):
    return caption_item(w, tmp, lambda p: p.write_text("<html>404</html>"), kind="images", blip2=True)


def caption_converted(w, tmp, mode):
    """An image in another mode (16-bit grey, CMYK, palette) is converted to RGB correctly: both captioned,
    and the converted picture is the original's, not white or black."""
    from common.data.datasets import load_image

    root = data_root(tmp)
    p = val_file(root, VAL[0], "images")
    rgb = Image.open(p).convert("RGB")
    if mode == "I;16":
        grey = np.asarray(rgb.convert("L"), np.uint16) * 257
        Image.fromarray(grey).save(p.with_suffix(".png"))
        p.with_suffix(".png").rename(p)
        want = np.asarray(rgb.convert("L"), np.float64)
    else:
        (rgb.convert(mode) if mode != "P" else rgb.quantize(256)).save(p, "JPEG" if mode == "CMYK" else "PNG")
        want = np.asarray(rgb.convert("L"), np.float64)
    out = tmp / "c.jsonl"

    def after(text):
        assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == VAL
        got = np.asarray(load_image(p).convert("L"), np.float64)
        assert np.abs(got - want).mean() < 12, f"{mode} converted to another picture"
    return Case(cap_args(root, out, blip2=w["blip2"]), 0, [], after=after)


@case("caption")
def case_caption_image_16bit(w, tmp):
    return caption_converted(w, tmp, "I;16")


@case("caption")
def case_caption_image_cmyk(w, tmp):
    return caption_converted(w, tmp, "CMYK")


@case("caption")
def case_caption_image_palette_mode(w, tmp):
    return caption_converted(w, tmp, "P")


def existing_captions(tmp, blip2=None):
    """A captions file already holding one line, from a run cut after one image (by BLIP-2 at blip2)."""
    out = tmp / "c.jsonl"
    CliRunner().invoke(cli_app(caption), [str(a) for a in cap_args(ADE_ROOT, out, "--limit", "1", blip2=blip2)])
    assert len(out.read_text().splitlines()) == 1
    return out


@case("caption")
def case_caption_disk_full(w, tmp):
    out = existing_captions(tmp, w["blip2"])
    return Case(cap_args(ADE_ROOT, out, blip2=w["blip2"]), 2, [str(out), "No space left"], out=out, grows=True,
                patches=fail_writes_under(tmp, errno.ENOSPC), after=lambda text: rerun_completes(out, w["blip2"]))


@case("caption")
def case_caption_labels_disk_full(w, tmp):
    out = existing_captions(tmp)
    return Case(cap_args(ADE_ROOT, out), 2, [str(out), "No space left"], out=out, grows=True,
                patches=fail_writes_under(tmp, errno.ENOSPC), after=lambda text: rerun_completes(out))


def rerun_completes(out, blip2=None):
    """Once the disk has room again, the same command finishes the file: every id once."""
    r = CliRunner().invoke(cli_app(caption), [str(a) for a in cap_args(ADE_ROOT, out, blip2=blip2)])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(x)["id"] for x in out.read_text().splitlines()) == VAL


@case("caption")
def case_caption_second_writer(w, tmp):
    out = existing_captions(tmp)
    return Case(cap_args(ADE_ROOT, out), 2, [str(out), "in use by another job", "pid"], out=out, hold=(out, True))


@case("caption")
def case_caption_out_is_a_synthetic_manifest(w, tmp):
    folder = synthetic(tmp / "syn")
    return Case(cap_args(ADE_ROOT, folder / "manifest.jsonl"), 2, [str(folder / "manifest.jsonl"), "not a caption manifest",
                                                                   "another --out"], out=folder)


@case("caption")
def case_caption_resumed_with_another_captioner(w, tmp):
    out = existing_captions(tmp)  # made by --captioner labels
    return Case(cap_args(ADE_ROOT, out, blip2=w["blip2"]), 2, [str(out), "'captioner': 'labels'", "'captioner': 'blip2'",
                                                                 "--captioner"], out=out)


@case("caption")
def case_caption_read_only_folder(w, tmp):
    out = existing_captions(tmp)
    return Case(cap_args(ADE_ROOT, out), 2, [str(out), "Read-only"], out=out, patches=fail_writes_under(tmp, errno.EROFS))


@case("caption")
def case_caption_two_images_with_one_stem(w, tmp):
    root = data_root(tmp)
    Image.open(val_file(root, VAL[0], "images")).save(val_file(root, VAL[0], "images").with_suffix(".png"))
    return Case(["--data-root", root, "--split", "val", "--captioner", "labels", "--out", tmp / "c.jsonl"], 2,
                [f"{VAL[0]}.jpg", f"{VAL[0]}.png", "one stem"], after=lambda text: _nothing_beside(tmp, {"ade", "c.jsonl"}))


# ---------------------------------------------------------------- sample ids as file names (issue 28 item 1)

def _nothing_beside(tmp: Path, allowed: set) -> None:
    """Nothing was written in the case's folder but what the case made (and the lock files of --out)."""
    extra = sorted(p.name for p in tmp.iterdir() if p.name not in allowed and ".lock." not in p.name)
    assert not extra, f"written outside --out: {extra}"
    assert not (tmp / "o").exists() or not [p for p in (tmp / "o").rglob("*") if p.is_file() and ".lock." not in p.name], \
        "samples written for a refused id"


def _id_case(stage: str, name: str, bad, why: str):
    def make(w, tmp):
        c = captions_file(tmp, [cap_line(VAL[0]), {**cap_line(VAL[1]), "id": bad}])
        args = ms_args(w, tmp / "o", captions=c) if stage == "masksyn" else img_args(w, tmp / "o", captions=c)
        return Case(args, 2, [f"{c}:2", "cannot name a file", why], after=lambda text: _nothing_beside(tmp, {"captions.jsonl", "o"}))
    make.__name__ = f"case_{stage}_id_{name}"
    case(stage)(make)


for _stage in ("masksyn", "imgsyn"):
    for _name, _bad, _why in (("escapes_out", "../../x", "path separator"), ("absolute", "/" + "seggen-absolute-id", "path separator"),
                              ("nests_folders", "a/b", "path separator"), ("null", None, "null"), ("empty", "", "empty"),
                              ("300_bytes", "x" * 300, "300 bytes"), ("nul_byte", "a\x00b", "control character")):
        _id_case(_stage, _name, _bad, _why)


@case("caption")
def case_caption_bad_shard(w, tmp):
    return Case(["--data-root", ADE_ROOT, "--split", "val", "--captioner", "labels", "--out", tmp / "c.jsonl", "--shard", "2/2"], 2,
                ["--shard 2/2", "I must be in 0..N-1"])


@case("imgsyn")
def case_imgsyn_bad_shard(w, tmp):
    return Case(img_args(w, tmp / "o", "--shard", "3"), 2, ["--shard 3", "expected I/N"])


@case("masksyn")
def case_masksyn_bad_shard(w, tmp):
    return Case(ms_args(w, tmp / "o", "--shard", "1/0"), 2, ["--shard 1/0", "N must be at least 1"])


@case("quality")
def case_quality_bad_shard(w, tmp):
    return Case(q_args(w, synthetic(tmp / "syn"), "--shard", "-1/2"), 2, ["--shard -1/2", "I must be in 0..N-1"], out=tmp / "syn")


# ---------------------------------------------------------------- imgsyn.py

@case("imgsyn")
def case_imgsyn_missing_captions(w, tmp):
    return Case(img_args(w, tmp / "o", captions=tmp / "none.jsonl"), 2, ["none.jsonl", "--captions"])


@case("imgsyn")
def case_imgsyn_unknown_ids(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), cap_line("ADE_val_99999999")])
    return Case(img_args(w, tmp / "o", captions=c), 2, ["ADE_val_99999999", "--captions"])


@case("imgsyn")
def case_imgsyn_null_caption(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), cap_line(VAL[1], None)])
    return Case(img_args(w, tmp / "o", captions=c), 2, [f"{c}:2"])


@case("imgsyn")
def case_imgsyn_empty_caption(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0], ""), cap_line(VAL[1])])
    return Case(img_args(w, tmp / "o", captions=c), 2, [f"{c}:1"])


@case("imgsyn")
def case_imgsyn_non_utf8_captions(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), json.dumps(cap_line(VAL[1], "caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9") + b"\n"])
    return Case(img_args(w, tmp / "o", captions=c), 2, [str(c)])


@case("imgsyn")
def case_imgsyn_captions_not_json(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), b"{id: ADE_val_00000002\n"])
    return Case(img_args(w, tmp / "o", captions=c), 2, [f"{c}:2"])


@case("imgsyn")
def case_imgsyn_resolution_not_multiple_of_8(w, tmp):
    args = img_args(w, tmp / "o")
    args[args.index("--resolution") + 1] = "70"
    return Case(args, 2, ["--resolution", "70"])


@case("imgsyn")
def case_imgsyn_out_is_a_file(w, tmp):
    (tmp / "o").write_text("notes")
    return Case(img_args(w, tmp / "o"), 2, ["--out", str(tmp / "o")], out=tmp / "o")


@case("imgsyn")
def case_imgsyn_mask2img_missing(w, tmp):
    return Case(img_args(w, tmp / "o", mask2img=tmp / "nothing"), 2, ["--mask2img", "nothing"])


@case("imgsyn")
def case_imgsyn_palette_duplicate_colours(w, tmp):
    cn = bad_palette(w["controlnet"], tmp / "cn", "duplicate")
    return Case(img_args(w, tmp / "o", mask2img=cn), 2, [str(cn / "palette.json")])


@case("imgsyn")
def case_imgsyn_palette_wrong_count(w, tmp):
    cn = bad_palette(w["controlnet"], tmp / "cn", "count")
    return Case(img_args(w, tmp / "o", mask2img=cn), 2, [str(cn / "palette.json")])


@case("imgsyn")
def case_imgsyn_missing_data_root(w, tmp):
    return Case(img_args(w, tmp / "o", root=tmp / "nowhere"), 2, ["nowhere"])


def imgsyn_item(w, tmp, breaks):
    root = data_root(tmp)
    breaks(val_file(root, VAL[0]))
    out = tmp / "o"

    def after(text):
        ids = [json.loads(x)["source_id"] for x in (out / "manifest.jsonl").read_text().splitlines()]
        assert ids == [VAL[1]]
    return Case(img_args(w, out, root=root), 1, [VAL[0]], after=after)


@case("imgsyn")
def case_imgsyn_label_truncated(w, tmp):
    return imgsyn_item(w, tmp, truncate)


@case("imgsyn")
def case_imgsyn_label_bomb(w, tmp):
    return imgsyn_item(w, tmp, bomb_png)


@case("imgsyn")
def case_imgsyn_label_wrong_size(w, tmp):
    return imgsyn_item(w, tmp, lambda p: Image.open(p).resize((40, 30), Image.NEAREST).save(p))


@case("imgsyn")
def case_imgsyn_label_out_of_range(w, tmp):
    def breaks(p):
        a = np.asarray(Image.open(p)).copy()
        a[:4, :4] = 200
        Image.fromarray(a).save(p)
    return imgsyn_item(w, tmp, breaks)


@case("imgsyn")
def case_imgsyn_mask2img_pickle_only(w, tmp):
    cn = pickle_only(w["controlnet"], tmp / "cn")
    return Case(img_args(w, tmp / "o", mask2img=cn), 2, ["--mask2img", str(cn), "safetensors"])


def existing_imgsyn(w, tmp):
    out = tmp / "o"
    r = CliRunner().invoke(cli_app(imgsyn), [str(a) for a in img_args(w, out, "--limit", "1")])
    assert r.exit_code == 0, r.output
    return out


@case("imgsyn")
def case_imgsyn_second_writer(w, tmp):
    out = existing_imgsyn(w, tmp)
    return Case(img_args(w, out), 2, ["--out", str(out), "in use by another job"], out=out, hold=(out, False))


@case("imgsyn")
def case_imgsyn_disk_full(w, tmp):
    out = existing_imgsyn(w, tmp)
    return Case(img_args(w, out), 2, [str(out), "No space left"], out=out, grows=True, patches=fail_writes_under(out, errno.ENOSPC))


@case("imgsyn")
def case_imgsyn_read_only_folder(w, tmp):
    out = existing_imgsyn(w, tmp)
    return Case(img_args(w, out), 2, [str(out), "Read-only"], out=out, patches=fail_writes_under(out, errno.EROFS))


# ---------------------------------------------------------------- masksyn.py

@case("masksyn")
def case_masksyn_text2mask_pickle_only(w, tmp):
    t2m = pickle_only(w["sdxl"], tmp / "t2m")
    return Case(ms_args(w, tmp / "o", text2mask=t2m), 2, ["--text2mask", str(t2m), "safetensors"])


@case("masksyn")
def case_masksyn_second_writer(w, tmp):
    (tmp / "o").mkdir()
    return Case(ms_args(w, tmp / "o"), 2, ["--out", "in use by another job"], out=tmp / "o", hold=(tmp / "o", False))

@case("masksyn")
def case_masksyn_missing_captions(w, tmp):
    return Case(ms_args(w, tmp / "o", captions=tmp / "none.jsonl"), 2, ["none.jsonl"])


@case("masksyn")
def case_masksyn_null_caption(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), cap_line(VAL[1], None)])
    return Case(ms_args(w, tmp / "o", captions=c), 2, [f"{c}:2"])


@case("masksyn")
def case_masksyn_non_utf8_captions(w, tmp):
    c = captions_file(tmp, [b'{"id": "a", "image": "x.jpg", "caption": "caf\xe9"}\n'])
    return Case(ms_args(w, tmp / "o", captions=c), 2, [str(c)])


@case("masksyn")
def case_masksyn_text2mask_missing(w, tmp):
    return Case(ms_args(w, tmp / "o", text2mask=tmp / "nothing"), 2, ["--text2mask", "nothing"])


@case("masksyn")
def case_masksyn_text2mask_palette_duplicate(w, tmp):
    t2m = bad_palette(w["sdxl"], tmp / "t2m", "duplicate")
    return Case(ms_args(w, tmp / "o", text2mask=t2m), 2, [str(t2m / "palette.json")])


@case("masksyn")
def case_masksyn_resolution_not_multiple_of_8(w, tmp):
    args = ms_args(w, tmp / "o")
    args[args.index("--resolution") + 1] = "100"
    return Case(args, 2, ["--resolution", "100"])


@case("masksyn")
def case_masksyn_out_is_a_file(w, tmp):
    (tmp / "o").write_text("notes")
    return Case(ms_args(w, tmp / "o"), 2, ["--out", str(tmp / "o")], out=tmp / "o")


# ---------------------------------------------------------------- the generator trainers

@case("train_text2mask")
def case_text2mask_missing_data_root(w, tmp):
    return Case(trainer(w, tmp / "run", root=tmp / "nowhere"), 2, ["nowhere"])


@case("train_text2mask")
def case_text2mask_wrong_layout(w, tmp):
    (tmp / "root/ADEChallengeData2016/images").mkdir(parents=True)
    return Case(trainer(w, tmp / "run", root=tmp / "root"), 2, ["ADEChallengeData2016"])


@case("train_text2mask")
def case_text2mask_resolution_not_multiple_of_8(w, tmp):
    args = trainer(w, tmp / "run")
    args[args.index("--resolution") + 1] = "70"
    return Case(args, 2, ["--resolution", "70"])


@case("train_text2mask")
def case_text2mask_missing_captions(w, tmp):
    return Case(trainer(w, tmp / "run", captions=tmp / "none.jsonl"), 2, ["none.jsonl"])


@case("train_text2mask")
def case_text2mask_unknown_ids(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), cap_line("ADE_val_99999999")])
    return Case(trainer(w, tmp / "run", captions=c), 2, ["ADE_val_99999999"])


@case("train_text2mask")
def case_text2mask_non_utf8_captions(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), json.dumps(cap_line(VAL[1], "caf\u00e9")).encode().replace(b"\\u00e9", b"\xe9") + b"\n"])
    return Case(trainer(w, tmp / "run", captions=c), 2, [str(c)])


@case("train_text2mask")
def case_text2mask_empty_caption(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), cap_line(VAL[1], "  ")])
    return Case(trainer(w, tmp / "run", captions=c), 2, [f"{c}:2"])


@case("train_text2mask")
def case_text2mask_pretrained_missing(w, tmp):
    return Case(trainer(w, tmp / "run", pretrained=tmp / "nothing"), 2, ["--pretrained", "nothing"])


@case("train_text2mask")
def case_text2mask_output_dir_is_a_file(w, tmp):
    (tmp / "run").write_text("notes")
    return Case(trainer(w, tmp / "run"), 2, ["--output-dir", str(tmp / "run")], out=tmp / "run")


@case("train_text2mask")
def case_text2mask_pretrained_pickle_only(w, tmp):
    base = pickle_only(w["sdxl"], tmp / "base")
    return Case(trainer(w, tmp / "run", pretrained=base), 2, ["--pretrained", str(base), "safetensors"])


@case("train_text2mask")
def case_text2mask_second_writer(w, tmp):
    (tmp / "run").mkdir()
    return Case(trainer(w, tmp / "run"), 2, ["--output-dir", "in use by another job"], out=tmp / "run", hold=(tmp / "run", False))


@case("train_mask2img")
def case_mask2img_second_writer(w, tmp):
    (tmp / "run").mkdir()
    return Case(trainer(w, tmp / "run"), 2, ["--output-dir", "in use by another job"], out=tmp / "run", hold=(tmp / "run", False))


@case("train_mask2img")
def case_mask2img_output_dir_is_a_file(w, tmp):
    (tmp / "run").write_text("notes")
    return Case(trainer(w, tmp / "run"), 2, ["--output-dir", str(tmp / "run")], out=tmp / "run")


@case("train_mask2img")
def case_mask2img_missing_captions(w, tmp):
    return Case(trainer(w, tmp / "run", captions=tmp / "none.jsonl"), 2, ["none.jsonl"])


@case("train_mask2img")
def case_mask2img_null_caption(w, tmp):
    c = captions_file(tmp, [cap_line(VAL[0]), cap_line(VAL[1], None)])
    return Case(trainer(w, tmp / "run", captions=c), 2, [f"{c}:2"])


@case("train_mask2img")
def case_mask2img_resolution_not_multiple_of_8(w, tmp):
    args = trainer(w, tmp / "run")
    args[args.index("--resolution") + 1] = "100"
    return Case(args, 2, ["--resolution", "100"])


@case("train_mask2img")
def case_mask2img_missing_data_root(w, tmp):
    return Case(trainer(w, tmp / "run", root=tmp / "nowhere"), 2, ["nowhere"])


@case("train_mask2img")
def case_mask2img_pretrained_missing(w, tmp):
    return Case(trainer(w, tmp / "run", pretrained=tmp / "nothing"), 2, ["--pretrained", "nothing"])


# ---------------------------------------------------------------- train_seg.py

@case("train_seg")
def case_seg_missing_data_root(w, tmp):
    return Case(seg_args(w, tmp / "run", "--strategy", "real", root=tmp / "nowhere"), 2, ["nowhere"])


@case("train_seg")
def case_seg_wrong_layout(w, tmp):
    (tmp / "root/somewhere/else").mkdir(parents=True)
    return Case(seg_args(w, tmp / "run", "--strategy", "real", root=tmp / "root"), 2, [str(tmp / "root")])


@case("train_seg")
def case_seg_symlink_outside_the_synthetic_folder(w, tmp):
    folder = synthetic(tmp / "syn")
    target = folder / "images" / f"{VAL[0]}_000.jpg"
    outside = tmp / "secret.jpg"
    shutil.move(target, outside)
    target.symlink_to(outside)
    return Case(seg_args(w, tmp / "run", "--synthetic", folder, "--strategy", "synthetic"), 2, [f"{VAL[0]}_000.jpg", "outside"])


@case("train_seg")
def case_seg_manifest_file_missing(w, tmp):
    folder = synthetic(tmp / "syn")
    (folder / "annotations" / f"{VAL[1]}_000.png").unlink()
    return Case(seg_args(w, tmp / "run", "--synthetic", folder, "--strategy", "synthetic"), 2,
                [f"{folder / 'manifest.jsonl'}:2", f"{VAL[1]}_000.png"])


@case("train_seg")
def case_seg_synthetic_null_caption(w, tmp):
    folder = synthetic(tmp / "syn")
    m = folder / "manifest.jsonl"
    lines = m.read_text().splitlines()
    lines[0] = json.dumps({**json.loads(lines[0]), "caption": None})
    m.write_text("\n".join(lines) + "\n")
    return Case(seg_args(w, tmp / "run", "--synthetic", folder, "--strategy", "synthetic"), 2, [f"{m}:1"])


@case("train_seg")
def case_seg_synthetic_duplicate_id(w, tmp):
    folder = synthetic(tmp / "syn")
    m = folder / "manifest.jsonl"
    lines = m.read_text().splitlines()
    m.write_text("\n".join([*lines, lines[0]]) + "\n")
    return Case(seg_args(w, tmp / "run", "--synthetic", folder, "--strategy", "synthetic"), 2, [f"{m}:3", f"{VAL[0]}_000"])


@case("train_seg")
def case_seg_output_dir_is_a_file(w, tmp):
    (tmp / "run").write_text("notes")
    return Case(seg_args(w, tmp / "run", "--strategy", "real"), 2, ["--output-dir", str(tmp / "run")], out=tmp / "run")


@case("train_seg")
def case_seg_second_writer(w, tmp):
    (tmp / "run").mkdir()
    return Case(seg_args(w, tmp / "run", "--strategy", "real"), 2, ["--output-dir", "in use by another job"], out=tmp / "run",
                hold=(tmp / "run", False))


@case("train_seg")
def case_seg_read_only_output(w, tmp):
    (tmp / "run").mkdir()
    return Case(seg_args(w, tmp / "run", "--strategy", "real"), 2, [str(tmp / "run"), "Read-only"], out=tmp / "run",
                patches=fail_writes_under(tmp / "run", errno.EROFS))


@case("train_seg")
def case_seg_model_missing(w, tmp):
    args = seg_args(w, tmp / "run", "--strategy", "real")
    args[args.index("--model") + 1] = tmp / "nothing"
    return Case(args, 2, ["--model", "nothing"])


# ---------------------------------------------------------------- quality.py

@case("quality")
def case_quality_symlink_outside(w, tmp):
    folder = synthetic(tmp / "syn")
    target = folder / "annotations" / f"{VAL[0]}_000.png"
    outside = tmp / "secret.png"
    shutil.move(target, outside)
    target.symlink_to(outside)
    return Case(q_args(w, folder), 2, [f"{VAL[0]}_000.png", "outside"])


@case("quality")
def case_quality_manifest_file_missing(w, tmp):
    folder = synthetic(tmp / "syn")
    (folder / "images" / f"{VAL[0]}_000.jpg").unlink()
    return Case(q_args(w, folder), 2, [f"{folder / 'manifest.jsonl'}:1"])


@case("quality")
def case_quality_segmenter_missing(w, tmp):
    folder = synthetic(tmp / "syn")
    return Case(q_args(w, folder, segmenter=tmp / "nope"), 2, ["--segmenter", "nope"], out=folder)


@case("quality")
def case_quality_second_writer(w, tmp):
    folder = synthetic(tmp / "syn")
    return Case(q_args(w, folder), 2, ["--synthetic", "in use by another job"], out=folder, hold=(folder, False))


@case("quality")
def case_quality_synthetic_missing(w, tmp):
    return Case(q_args(w, tmp / "nowhere"), 2, ["nowhere"])


@case("quality")
def case_quality_path_escapes_the_folder(w, tmp):
    folder = synthetic(tmp / "syn")
    m = folder / "manifest.jsonl"
    lines = m.read_text().splitlines()
    lines[1] = json.dumps({**json.loads(lines[1]), "image": "../secret.jpg"})
    m.write_text("\n".join(lines) + "\n")
    return Case(q_args(w, folder), 2, ["../secret.jpg"])


def edit_manifest(folder: Path, line: int, **fields) -> Path:
    """Set fields of one line of folder/manifest.jsonl (0-based), written as json.dumps writes them."""
    m = folder / "manifest.jsonl"
    lines = m.read_text().splitlines()
    lines[line] = json.dumps({**json.loads(lines[line]), **fields})
    m.write_text("\n".join(lines) + "\n")
    return m


@case("quality")
def case_quality_folder_drawn_for_another_data(w, tmp):
    folder = synthetic(tmp / "syn")
    for n in range(len(VAL)):
        edit_manifest(folder, n, settings={"data": "coco"})
    return Case(q_args(w, folder), 2, ["--synthetic", str(folder), "--data coco", "not --data ade20k"], out=folder)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), 1.5, -1, "1"])
def test_a_draw_that_is_not_a_whole_number_is_refused_naming_file_and_line(tmp_path, bad):
    from common import SegGenError
    from common.data.datasets import read_synthetic

    m = edit_manifest(synthetic(tmp_path / "syn"), 1, k=bad)
    with pytest.raises(SegGenError, match=rf"{re.escape(str(m))}:2: k must be a whole number"):
        read_synthetic(m.parent)


@case("quality")
def case_quality_nan_k(w, tmp):
    folder = synthetic(tmp / "syn")
    m = edit_manifest(folder, 1, k=float("nan"))
    return Case(q_args(w, folder), 2, [f"{m}:2", "k must be a whole number", "got nan"], out=folder)


def retrained(src: Path, dst: Path) -> Path:
    """The segmenter at dst trained again: the same files, other weights."""
    from safetensors.torch import load_file, save_file

    for f in dst.glob("*.safetensors"):
        save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in load_file(f).items()}, f)
    return dst


@case("quality")
def case_quality_resumed_after_the_segmenter_was_retrained(w, tmp):
    folder, seg = synthetic(tmp / "syn"), tmp / "seg"
    shutil.copytree(w["mask2former"], seg)
    first = CliRunner().invoke(cli_app(quality), [str(a) for a in q_args(w, folder, "--reference", "folder", segmenter=seg)])
    assert first.exit_code == 0, first.output
    retrained(w["mask2former"], seg)
    return Case(q_args(w, folder, "--reference", "folder", segmenter=seg), 2,
                [f"--segmenter {seg} has changed since", str(folder / "quality.jsonl"), "to judge again"], out=folder)


# ---------------------------------------------------------------- SIGTERM in the generation stages (issue 28 item 4)

def sigterm_in(obj, attr: str) -> list:
    """A patch: the first call of obj.attr sends this process a real SIGTERM (what a scheduler sends before
    SIGKILL) in the middle of the first batch, which must still end whole."""
    import signal

    real = getattr(obj, attr)

    def wrapped(*a, **k):
        if not wrapped.sent:
            wrapped.sent = True
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*a, **k)
    wrapped.sent = False
    return [(obj, attr, wrapped)]


def ends_whole_and_resumes(manifest: Path, rerun: list, stage, want: list, files=("image", "annotation", "colormap")):
    """After the SIGTERM: the first batch's line only, its files complete; the same command then finishes."""
    from common.data.datasets import load_image

    lines = [json.loads(x) for x in manifest.read_text().splitlines()]
    assert len(lines) == 1, f"{manifest}: {len(lines)} line(s) after SIGTERM in the first batch, want 1"
    for key in files:
        if key in lines[0]:
            load_image(manifest.parent / lines[0][key])  # complete, readable
    r = CliRunner().invoke(cli_app(stage), [str(a) for a in rerun])
    assert r.exit_code == 0, r.output
    assert sorted(json.loads(x)["id"] for x in manifest.read_text().splitlines()) == want


PREEMPTED_NAMES = ["SIGTERM", "Run the same command again"]


@case("caption")
def case_caption_sigterm_mid_run(w, tmp):
    from common.runtime.cluster import PREEMPTED

    out, args = tmp / "c.jsonl", cap_args(ADE_ROOT, tmp / "c.jsonl")
    return Case(args, PREEMPTED, PREEMPTED_NAMES, patches=sigterm_in(caption, "labels_caption"),
                after=lambda text: ends_whole_and_resumes(out, args, caption, VAL, files=()))


@case("imgsyn")
def case_imgsyn_sigterm_mid_batch(w, tmp):
    from common.runtime.cluster import PREEMPTED
    from common.synthesis import synth

    out = tmp / "o"
    args = img_args(w, out)
    return Case(args, PREEMPTED, PREEMPTED_NAMES, patches=sigterm_in(synth, "sample_images"),
                after=lambda text: ends_whole_and_resumes(out / "manifest.jsonl", args, imgsyn, [f"{v}_000" for v in VAL]))


@case("masksyn")
def case_masksyn_sigterm_mid_batch(w, tmp):
    from common.runtime.cluster import PREEMPTED
    from common.synthesis import synth

    out = tmp / "o"
    args = ms_args(w, out)
    return Case(args, PREEMPTED, PREEMPTED_NAMES, patches=sigterm_in(synth, "sample_images"),
                after=lambda text: ends_whole_and_resumes(out / "manifest.jsonl", args, masksyn, [f"{c}_000" for c in TRAIN_CAPTIONS]))


@case("quality")
def case_quality_sigterm_mid_run(w, tmp):
    from common.runtime.cluster import PREEMPTED

    folder = synthetic(tmp / "syn")
    args = q_args(w, folder, "--reference", "folder")
    return Case(args, PREEMPTED, PREEMPTED_NAMES, patches=sigterm_in(quality, "figures_of"),
                after=lambda text: ends_whole_and_resumes(folder / "quality.jsonl", args, quality, [f"{v}_000" for v in VAL], files=()))


# ---------------------------------------------------------------- the catalogue

def holding(out, file):
    """Another job holding the output's lock: a child process that takes it and sleeps (a real second
    writer: flock locks belong to open files, so this process could not refuse itself)."""
    import subprocess
    import sys
    import time

    from common.runtime.lock import lock_path

    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); from common.runtime.lock import output_lock\n"
            "with output_lock(sys.argv[2], file=sys.argv[3] == '1'):\n print('held', flush=True); time.sleep(600)")
    p = subprocess.Popen([sys.executable, "-c", code, str(Path(__file__).parents[1]), str(out), "1" if file else "0"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    assert lock_path(out, 0, file).exists()
    return p


def cli_app(module):
    app = getattr(module, "app", None)
    if app is None:
        app = typer.Typer()
        app.command()(module.main)
    return app


def outcome(w, tmp, name):
    """Run one case; returns (verdict, detail): verdict is clear, traceback, silent, lost or wrong."""
    stage, build = CASES[name] if name in CASES else PENDING[name][:2]
    c = build(w, tmp)
    before = snapshot(c.out)
    mp = pytest.MonkeyPatch()
    holder = holding(*c.hold) if c.hold else None
    try:
        for obj, attr, value in c.patches:
            mp.setattr(obj, attr, value)
        result = CliRunner().invoke(cli_app(STAGES[stage]), [str(a) for a in c.args], terminal_width=400)
    finally:
        mp.undo()
        if holder is not None:
            holder.terminate()
            holder.wait()
    text = " ".join(result.output.split())
    if (result.exception is not None and not isinstance(result.exception, SystemExit)) or "Traceback" in result.output:
        import traceback
        tb = "".join(traceback.format_exception(result.exception)) if result.exception else result.output
        return "traceback", tb[-1500:]
    after = snapshot(c.out)
    if c.out is not None and after != before:
        kept = c.grows and all(k in after and after[k].startswith(v) for k, v in before.items())
        lines = [x for k, v in after.items() if k.endswith(".jsonl") and "errors" not in k for x in v.splitlines()]
        ids = [r["id"] for r in map(json.loads, filter(bytes.strip, lines)) if isinstance(r, dict) and "id" in r]
        if not kept or len(ids) != len(set(ids)):
            return "lost", f"{c.out} changed: {sorted(set(before) ^ set(after)) or 'bytes'}"
    if result.exit_code != c.code:
        return ("silent" if result.exit_code == 0 else "wrong"), f"exit {result.exit_code}, want {c.code}: {text[-800:]}"
    missing = [n for n in c.names if n not in text]
    if missing:
        return "wrong", f"message does not name {missing}: {text[-800:]}"
    if c.after is not None:
        try:
            c.after(text)
        except AssertionError as e:
            return "silent", f"{e}: {text[-400:]}"
    return "clear", ""


@pytest.mark.parametrize("name", list(CASES))
def test_fault(name, w, tmp_path):
    verdict, detail = outcome(w, tmp_path, name)
    assert verdict == "clear", f"{name}: {verdict}: {detail}"


def test_catalogue_covers_every_stage():
    assert len(CASES) >= 40
    assert {stage for stage, _ in CASES.values()} == set(STAGES)


if __name__ == "__main__":  # the whole catalogue, pending cases included: counts per verdict
    import sys
    import tempfile

    from common.models import tiny

    tmp = Path(tempfile.mkdtemp(prefix="faults-"))
    built = {}

    def get(kind):
        if kind not in built:
            built[kind] = tiny.save(kind, tmp / f"tiny-{kind}", get("sdxl") if kind == "controlnet" else None)
        return built[kind]

    (tmp / "faults").mkdir()
    world = {"tmp": tmp, "sdxl": get("sdxl"), "controlnet": get("controlnet"), "blip2": get("blip2"),
             "captions": write_captions(tmp / "captions.jsonl"), "mask2former": get("mask2former")}
    counts: dict[str, int] = {}
    for name in [*CASES, *PENDING]:
        (tmp / name).mkdir()
        verdict, detail = outcome(world, tmp / name, name)
        counts[verdict] = counts.get(verdict, 0) + 1
        print(f"{verdict:9s} {name}{'  (pending)' if name in PENDING else ''}{'' if verdict == 'clear' else ': ' + detail.splitlines()[-1][:200]}",
              flush=True)
    print(f"{len(CASES) + len(PENDING)} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    shutil.rmtree(tmp)
    sys.exit(0 if set(counts) == {"clear"} else 1)
