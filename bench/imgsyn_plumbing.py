"""imgsyn.py's plumbing with the model stubbed out: CPU seconds per sample that block the loop (where a GPU
would wait), at 768 px, the loop as it was against the loop now, in the same run (issue 18 item 3).

The model is replaced by a stub that returns the same VAE output for every batch: a real ADE20K photo
scaled to the generation size (768 x 1024 for a 512 x 683 label), as a (B, 3, H, W) float tensor in
[-1, 1]. Everything else is imgsyn's: the label and its colour map, the control tensor, the conversion
to uint8, the resize back to the label's size, JPEG/PNG encoding, atomic saves, the manifest.

- before: the loop as it was before issue 18 item 3 (commit 0da86de, copied here): control tensor per
  batch from each sample's resized colour map, float->uint8 in numpy, the resize and three encodes per
  sample in the loop (the colour map re-encoded for each sample), one fsync per manifest line.
- after: `imgsyn.imgsyn` itself (stubbed model): encoding and saving in `synth.SampleSink`'s threads,
  a source's colour map written once and linked, control rows once per source, one fsync per batch.

"loop CPU" is the main thread's CPU time (time.thread_time) from the first model call to the end of the
run, per written sample; "all CPU" adds the writing threads' (the process's CPU time), to show the work
moved off the loop, and what it costs in all. Target (issue 18): loop CPU <= 0.05 s/sample. The written
files of both are compared byte for byte.

    nice -n 10 python bench/imgsyn_plumbing.py [--sources 2] [--per-sample 8] [--batch 4] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

import imgsyn  # noqa: E402
from common.synthesis import synth  # noqa: E402
from common.masks.colormap import palette_for, resize_nearest  # noqa: E402
from common.data.datasets import read_dataset  # noqa: E402
from common.data.manifest import ManifestWriter, rank_path  # noqa: E402

# ---------------------------------------------------------------- defaults
SOURCES = 2  # human labels (copies of tests/data's 512 x 683 ADE20K sample)
PER_SAMPLE = 8  # images per label (paper: 50)
BATCH = 4  # imgsyn --batch-size default
RESOLUTION = 768  # paper A.4
THREADS = 2  # imgsyn's write_threads default
SAMPLE = ROOT / "tests/data/ade20k/ADEChallengeData2016"
SAMPLE_ID = "ADE_val_00000001"


def save_sample_inline(out: Path, sid: str, image: np.ndarray, colormap: np.ndarray, save_annotation) -> None:
    """The old loop's way (before synth.SampleSink): the sample's files at the paths of `sample_record`, each complete before its manifest line
    (docs/design.md "Data contract"). save_annotation(path) writes the annotation PNG."""
    synth.atomic_save(out / "images" / f"{sid}.jpg", lambda p: synth.save_jpeg(p, image))
    synth.atomic_save(out / "colormaps" / f"{sid}.png", lambda p: synth.save_png(p, colormap))
    synth.atomic_save(out / "annotations" / f"{sid}.png", save_annotation)


def make_dataset(root: Path, sources: int) -> tuple[Path, Path]:
    """An ADE20K-layout val split of `sources` copies of the 512 x 683 test sample, and its captions."""
    data = root / "ade20k"
    for sub, ext in (("images", "jpg"), ("annotations", "png")):
        (data / "ADEChallengeData2016" / sub / "validation").mkdir(parents=True)
        for i in range(sources):
            shutil.copy(SAMPLE / sub / "validation" / f"{SAMPLE_ID}.{ext}",
                        data / "ADEChallengeData2016" / sub / "validation" / f"ADE_val_{i + 1:08d}.{ext}")
    shutil.copytree(ROOT / "tests/data/ade20k/meta", data / "meta")
    captions = root / "captions.jsonl"
    captions.write_text("".join(json.dumps({"id": s.id, "image": s.image.name, "caption": "a room"}) + "\n"
                                for s in read_dataset("ade20k", data, "val")))
    return data, captions


class Stub:
    """The model: the same decoded picture for every batch; marks the first call (the loop's start)."""

    def __init__(self):
        photo = Image.open(SAMPLE / "images/validation" / f"{SAMPLE_ID}.jpg").convert("RGB")
        size = imgsyn.generation_size(photo.height, photo.width, RESOLUTION)  # (h, w)
        pic = np.asarray(photo.resize(size[::-1], Image.BICUBIC), np.float32) / 127.5 - 1
        self.decoded = torch.from_numpy(pic).permute(2, 0, 1)[None]  # (1, 3, h, w) in [-1, 1], as the VAE's output
        self.start = None

    def vae_output(self, n: int) -> torch.Tensor:
        if self.start is None:
            self.start = (time.thread_time(), time.process_time())
        return self.decoded.expand(n, -1, -1, -1)

    def sample_images(self, gen, cond, uncond, generators, size, steps, sampling, control=None):
        assert control is not None and control.shape[0] == len(generators)
        return synth.to_uint8(self.vae_output(len(generators)))


def stubbed(stub: Stub):
    """imgsyn with the model stubbed (the loader, the text encoder and the sampler)."""
    palette = palette_for("ade20k", "generation")
    synth.check_controlnet = lambda mask2img, base, data: ("stub-base", "sdxl")
    synth.model_palette = lambda folder, data: palette
    synth.recorded_vae = lambda mask2img: None
    synth.load_mask2img = lambda *a, **k: synth.Generator(None, None, True, torch.device("cpu"), torch.float32)
    synth.caption_note = lambda *a, **k: None
    synth.encode = lambda gen, captions, size: (None, None)
    synth.sample_images = stub.sample_images


def old_loop(out: Path, data: Path, captions: Path, stub: Stub, sources: int, per_sample: int, batch_size: int) -> int:
    """imgsyn's loop before issue 18 item 3 (commit 0da86de), the model stubbed the same way."""
    samples = {s.id: s for s in read_dataset("ade20k", data, "val")}
    caps = {json.loads(x)["id"]: "a room" for x in captions.read_text().splitlines()}
    settings = imgsyn.Settings(data="ade20k", resolution=RESOLUTION, steps=40, guidance=5.0, sampler="euler", schedule="legacy",
                               S_churn=0.0, S_tmin=0.0, S_tmax=None, S_noise=1.0, seed=0, precision="fp32", palette="ade20k")
    palette, cache, written = palette_for("ade20k", "generation"), {}, 0
    with ManifestWriter(rank_path(out / "manifest.jsonl", 0, 1), imgsyn.PATH_FIELDS) as writer:
        for batch in synth.plan_batches(sorted(caps), per_sample, batch_size):
            for gone in set(cache) - {s for s, _ in batch}:
                del cache[gone]
            inputs = [imgsyn.source_inputs(samples[s], "ade20k", palette, cache) for s, _ in batch]
            sizes = [imgsyn.generation_size(*i["label"].shape, RESOLUTION) for i in inputs]
            images = [None] * len(batch)
            for size in dict.fromkeys(sizes):
                idx = [i for i, sz in enumerate(sizes) if sz == size]
                control = torch.from_numpy(np.stack([resize_nearest(inputs[i]["colormap"], size[::-1]) for i in idx])).permute(0, 3, 1, 2).float() / 255
                assert control.shape[0] == len(idx)
                image = (stub.vae_output(len(idx)).float() / 2 + 0.5).clamp(0, 1)
                pics = (image.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
                for i, im in zip(idx, pics):
                    h, w = inputs[i]["label"].shape
                    images[i] = im if (h, w) == size else np.asarray(Image.fromarray(im).resize((w, h), Image.BICUBIC))
            for (s, k), image in zip(batch, images):
                sid = synth.sample_id(s, k)
                save_sample_inline(out, sid, image, cache[s]["colormap"], lambda p, a=samples[s].annotation: synth.link_or_copy(a, p))
                writer.append(synth.sample_record("imgsyn", sid, s, k, caps[s], settings, {}, batch))
                written += 1
    return written


def measure(run, stub: Stub) -> dict:
    stub.start = None
    written = run()
    loop, total = time.thread_time() - stub.start[0], time.process_time() - stub.start[1]
    return {"written": written, "loop": loop / written, "all": total / written}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sources", type=int, default=SOURCES)
    ap.add_argument("--per-sample", type=int, default=PER_SAMPLE)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--threads", type=int, default=THREADS, help="imgsyn's write_threads (0: write in the loop)")
    a = ap.parse_args()
    torch.set_num_threads(1)  # the conversions' CPU counted on the loop's thread, as with one core per GPU process
    stub = Stub()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data, captions = make_dataset(tmp, a.sources)
        old = measure(lambda: old_loop(tmp / "old", data, captions, stub, a.sources, a.per_sample, a.batch), stub)
        stubbed(stub)
        new = measure(lambda: imgsyn.imgsyn(data="ade20k", data_root=data, split="val", captions=captions, per_sample=a.per_sample,
                                            batch_size=a.batch, resolution=RESOLUTION, out=tmp / "new", mask2img="stub",
                                            write_threads=a.threads)["written"], stub)
        same = all((tmp / "old" / sub / f.name).read_bytes() == f.read_bytes()
                   for sub in ("images", "colormaps", "annotations") for f in (tmp / "new" / sub).iterdir())
    print(f"imgsyn plumbing at {RESOLUTION} px (512 x 683 labels drawn at 768 x 1024), model stubbed; {old['written']} samples, "
          f"batch {a.batch}, write threads {a.threads}")
    print(f"{'':8} {'loop CPU s/sample':>18} {'all CPU s/sample':>17}")
    for name, r in (("before", old), ("after", new)):
        print(f"{name:8} {r['loop']:18.4f} {r['all']:17.4f}")
    print(f"loop CPU after/before: {new['loop'] / old['loop']:.2f}x (target: after <= 0.05 s/sample); files byte-identical: {same}")


if __name__ == "__main__":
    main()
