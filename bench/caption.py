"""caption.py's overhead: images/s of the whole job (listing, decoding in DataLoader workers, batching,
writing the manifest) against a bare loop of `processor + model.generate` over the same images,
already decoded, at the same batch size, with the same tiny BLIP-2. Goal: ratio >= 0.9, the median of
--rounds runs of caption.py, each against the bare runs just before and after it.

On a CPU both run with one torch thread and caption.py decodes in one DataLoader worker (--threads 1
--num-workers 1): the worker has a core of its own, as the data path has beside a GPU. With more threads
than the cores left over, decoding and generate compete for the same cores, and the ratio then measures
the machine's size rather than caption.py.

    python bench/caption.py [--images 256] [--batch-size 16] [--rounds 3] [--num-workers 1] [--threads 1] [--model FOLDER]

Without --model a tiny BLIP-2 is built (common.models.tiny). The images are the real ADE20K samples of
tests/data, repeated under new names in a temporary ADE20K layout.
"""

import argparse
import copy
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

import rounds  # noqa: E402  (bench/rounds.py: the rounds protocol)
from caption import PAPER_PROMPT, caption  # noqa: E402
from common.models import tiny  # noqa: E402
from common.data.datasets import load_image, read_dataset  # noqa: E402


def make_dataset(root: Path, n: int) -> None:
    src = read_dataset("ade20k", ROOT / "tests/data/ade20k", "train") + read_dataset("ade20k", ROOT / "tests/data/ade20k", "val")
    for sub in ("images/training", "annotations/training"):
        (root / "ADEChallengeData2016" / sub).mkdir(parents=True)
    for i in range(n):
        s = src[i % len(src)]
        shutil.copy(s.image, root / f"ADEChallengeData2016/images/training/img_{i:05d}.jpg")
        shutil.copy(s.annotation, root / f"ADEChallengeData2016/annotations/training/img_{i:05d}.png")


def bare_loop(model_dir: Path, images, batch_size: int, max_new_tokens: int) -> float:
    from transformers import Blip2ForConditionalGeneration, Blip2Processor

    net = Blip2ForConditionalGeneration.from_pretrained(model_dir).eval()
    processor = Blip2Processor.from_pretrained(model_dir)
    gen = copy.deepcopy(net.generation_config)
    gen.max_new_tokens = max_new_tokens
    start = time.perf_counter()
    for i in range(0, len(images), batch_size):
        batch = images[i:i + batch_size]
        inputs = processor(images=batch, text=[PAPER_PROMPT] * len(batch), return_tensors="pt", padding=True)
        with torch.inference_mode():
            ids = net.generate(**inputs, generation_config=gen)
        processor.batch_decode(ids, skip_special_tokens=True)
    return len(images) / (time.perf_counter() - start)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=3, help="runs of caption.py, each between two bare runs")
    ap.add_argument("--num-workers", type=int, default=1, help="caption.py's DataLoader workers")
    ap.add_argument("--threads", type=int, default=None if torch.cuda.is_available() else 1,
                    help="torch threads of generate (CPU default 1: the worker decodes on a core of its own, as beside a "
                         "GPU; with more, decoding and generate compete for a small machine's cores)")
    ap.add_argument("--model", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        os.environ["SEGGEN_THREADS"] = str(args.threads)  # caption.py's threads.configure() reads it
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model = args.model or tiny.save("blip2", tmp / "blip2")
        make_dataset(tmp / "data", args.images)
        images = [load_image(s.image) for s in read_dataset("ade20k", tmp / "data", "train")]
        bare_loop(model, images[: args.batch_size], args.batch_size, args.max_new_tokens)  # warm-up
        def ours_run(r: int) -> float:
            s = caption("ade20k", tmp / "data", "train", tmp / f"captions-{r}.jsonl", model=str(model), batch_size=args.batch_size,
                        max_new_tokens=args.max_new_tokens, num_workers=args.num_workers)
            return s["captioned"] / s["seconds"]

        bare, ours = rounds.interleaved(lambda: bare_loop(model, images, args.batch_size, args.max_new_tokens), ours_run, args.rounds)
    ratios = rounds.ratios(ours, bare)
    print(f"{args.images} images, batch {args.batch_size}, max_new_tokens {args.max_new_tokens}, {args.num_workers} worker(s), "
          f"torch threads {torch.get_num_threads()}, model {model}")
    print(f"  bare processor+generate loop (images pre-decoded), img/s: {', '.join(f'{b:.2f}' for b in bare)}")
    print(f"  caption.py (decode, batch, generate, write), img/s:       {', '.join(f'{o:.2f}' for o in ours)}")
    print(f"  ratio caption.py / bare loop by round: {', '.join(f'{x:.2f}' for x in ratios)}")
    print(f"  ratio caption.py / bare loop: {statistics.median(ratios):.2f}  (median of {len(ratios)} rounds; goal >= 0.9)")


if __name__ == "__main__":
    main()
