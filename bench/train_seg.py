"""train_seg.py's training loop against a bare loop of the same model, in one run (issue 6's benchmark):

- bare: forward / backward / clip / AdamW step of the same Mask2Former on batches made beforehand
  (images normalised, targets built), nothing else;
- ours: `train_seg.py --strategy aug --p-aug 0.6` end to end: MixedBatches' p_aug draws, decoding,
  random resize / crop / photometric distortion / flip and the segment ids of Mask2Former's targets in DataLoader workers,
  stats and the progress bar.

Goal: ours / bare >= 0.9, i.e. the data path does not starve the model. Both on the real ADE20K
samples (tests/data) with a synthetic folder made of copies of them; the model is the tiny one
(common/models/tiny.py) unless --model / --backbone names another (on a GPU: --backbone r50 or swin-l,
--crop 512 / 640, --batch-size 16, --mixed-precision bf16). Prints it/s of both and the ratio: the median of
--rounds runs of train_seg.py, each against the mean of the bare runs just before and after it.

On a CPU both loops run with one torch thread (--threads 1), so that train_seg's one DataLoader worker has
a core of its own, as the data path has beside a GPU; with 2 threads on a 2-core machine the worker's
decoding and augmentation take cores from the step, and the ratio measures that instead.

    python bench/train_seg.py [--steps 60] [--rounds 3] [--crop 128] [--batch-size 2] [--num-workers 1] [--threads 1]
"""

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import rounds  # noqa: E402  (bench/rounds.py: the rounds protocol)
import train_seg  # noqa: E402
from common.seg import data as segdata  # noqa: E402
from common.seg import model as segmodel  # noqa: E402
from common.models import tiny  # noqa: E402
from common.data.datasets import read_dataset  # noqa: E402
from common.data.manifest import ManifestWriter  # noqa: E402

ADE = ROOT / "tests" / "data" / "ade20k"


def synthetic_copies(folder: Path, n: int = 8) -> Path:
    """A synthetic folder of copies of the real training + validation samples."""
    samples = read_dataset("ade20k", ADE, "train") + read_dataset("ade20k", ADE, "val")
    for sub in ("images", "annotations", "colormaps"):
        (folder / sub).mkdir(parents=True)
    with ManifestWriter(folder / "manifest.jsonl", path_fields=("image", "annotation", "colormap")) as w:
        for k in range(n):
            s = samples[k % len(samples)]
            sid = f"syn{k}"
            shutil.copy(s.image, folder / f"images/{sid}.jpg")
            shutil.copy(s.annotation, folder / f"annotations/{sid}.png")
            shutil.copy(s.annotation, folder / f"colormaps/{sid}.png")
            w.append({"id": sid, "source_id": s.id, "method": "imgsyn", "image": f"images/{sid}.jpg",
                      "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png",
                      "caption": "", "seed": k, "models": {}})
    return folder


def bare_loop(model_dir, backbone, args, device) -> float:
    """it/s of forward/backward/step alone, on batches drawn and augmented beforehand."""
    net, processor = segmodel.build_model(model_dir, backbone, "ade20k")
    segmodel.freeze_unused(net)
    net.to(device).train()
    real = read_dataset("ade20k", ADE, "train")
    data = segdata.SegData([real], "ade20k", args.crop)
    sampler = train_seg.MixedBatches(len(real), [], args.batch_size, 0.0, 0, 0, 8)
    mean = torch.tensor(processor.image_mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(processor.image_std, device=device).view(1, 3, 1, 1) * 255
    batches = []
    for keys in sampler:
        items = [data[k] for k in keys]
        labels = torch.stack([x["label"] for x in items]).to(device)
        masks, classes, _ = segdata.mask_targets(labels)
        images = (torch.stack([x["image"] for x in items]).to(device).float() - mean) / std
        batches.append((images, torch.stack([x["valid"] for x in items]).to(device).long(), masks, classes))
    optimizer = torch.optim.AdamW(segmodel.param_groups(net, 1e-4, 0.05, 0.1), lr=1e-4)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.mixed_precision)

    def step(i):
        images, valid, masks, classes = batches[i % len(batches)]
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = net(pixel_values=images, pixel_mask=valid, mask_labels=masks, class_labels=classes).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 0.01)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    for i in range(args.warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for i in range(args.steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return args.steps / (time.perf_counter() - t)


def ours(model_dir, backbone, args, work: Path) -> float:
    """it/s of train_seg.py itself, from its stats.jsonl (the first window, with the warm-up, left out)."""
    window = max(args.steps // 3, 1)  # 4 windows of stats.jsonl: the first (with start-up) is left out
    cli = ["--data-root", ADE, "--synthetic", synthetic_copies(work / "synth"), "--strategy", "aug", "--p-aug", "0.6",
           "--max-steps", 4 * window, "--log-every", window, "--batch-size", args.batch_size, "--crop", args.crop,
           "--num-workers", args.num_workers, "--checkpoint-every", 0, "--output-dir", work / "run", "--eval-size", 32]
    cli += ["--model", model_dir] if model_dir else ["--backbone", backbone.value, "--backbone-weights", "none"]  # speed only
    if args.mixed_precision:
        cli += ["--mixed-precision", args.mixed_precision]
    result = CliRunner().invoke(train_seg.app, [str(c) for c in cli])
    if result.exit_code != 0:
        raise SystemExit(result.output + repr(result.exception))
    rates = [r["it_per_s"] for r in map(json.loads, (work / "run/stats.jsonl").read_text().splitlines()) if r["it_per_s"]]
    return 1 / (sum(1 / r for r in rates[1:]) / len(rates[1:]))  # mean time per step over the later windows


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60, help="timed steps of each loop")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--rounds", type=int, default=3, help="runs of train_seg.py, each between two bare runs")
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--num-workers", type=int, default=1)
    p.add_argument("--model", help="Mask2Former folder / hub id (default: the tiny model)")
    p.add_argument("--backbone", choices=[b.value for b in train_seg.Backbone], help="a paper configuration, random weights")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"])
    p.add_argument("--threads", type=int, default=1 if not torch.cuda.is_available() else None,
                   help="torch threads of the step (CPU default 1: the worker gets a core of its own, as the data path "
                        "has beside a GPU; with more, the two compete on a small machine and the ratio measures that)")
    args = p.parse_args()
    if args.threads:
        os.environ["SEGGEN_THREADS"] = str(args.threads)  # train_seg's threads.configure() reads it
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        backbone = train_seg.Backbone(args.backbone) if args.backbone else None
        model_dir = args.model or (None if backbone else str(tiny.save("mask2former", work / "tiny")))
        print(f"device {device}, torch threads {torch.get_num_threads()}, crop {args.crop}, batch {args.batch_size}, "
              f"{args.num_workers} worker(s), model {model_dir if args.model else backbone.value if backbone else 'tiny'}")
        bare, full = rounds.interleaved(lambda: bare_loop(model_dir, backbone, args, device),
                                        lambda r: ours(model_dir, backbone, args, work / f"round{r}"), args.rounds)
        if device.type == "cuda":
            print(f"peak GPU memory (bare loops): {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
    ratios = rounds.ratios(full, bare)
    print(f"bare forward/backward/step, it/s: {', '.join(f'{b:.2f}' for b in bare)}")
    print(f"train_seg.py (p_aug 0.6, augmentation, {args.num_workers} worker(s)), it/s: {', '.join(f'{f:.2f}' for f in full)}")
    print(f"ratio ours / bare by round: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(f"ratio ours / bare: {statistics.median(ratios):.2f} (median of {len(ratios)} rounds; goal >= 0.9)")


if __name__ == "__main__":
    main()
