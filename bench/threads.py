"""A tiny trainer step alone and beside CPU-heavy jobs, for several thread / worker settings, in one run.

Issue 17 item 9: under a load average of 5–7 on 2 cores the demo's trainers took ~13 s per tiny step
against ~0.7 s alone. This bench finds which setting turns 3× contention into 20×.

- step: the tiny SDXL UNet (common/models/tiny.py) forward+backward + AdamW on latents of the tiny VAE, 64×64
  images, batch 2, read and cropped from the real ADE20K samples through a DataLoader; like
  bench/train_step.py's "bare+VAE" plus the data.
- settings: torch threads = all cores (torch's default) or 1; OMP_WAIT_POLICY unset or PASSIVE;
  DataLoader workers 0 or 4; and "auto", what common/runtime/threads.py picks. One process per OMP_WAIT_POLICY
  (OpenMP reads it when torch starts its pool) times each of its settings alone, then starts the load,
  times it again, and stops the load.
- load: N extra processes, each busy (`spin`: a pure Python loop, one core each) or each a torch job
  with torch's default threads (`torch`: matmuls of 256×256, like another trainer or test suite).

Prints seconds per step (median after warm-up) alone and loaded, and the ratio loaded / alone. The
machine may carry other load than ours (its load average is printed); read the ratios, and the spread
between settings, not the absolute times.

    python bench/threads.py [--load spin|torch] [--jobs 3] [--steps 8] [--only NAME]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((ROOT / "tests" / "data" / "ade20k").rglob("*.jpg"))

# name: (OMP_WAIT_POLICY, torch threads: None = torch's default (one per core), "auto" = common.runtime.threads; workers)
SETTINGS = {
    "default (threads=cores, 0 workers)": (None, None, 0),
    "threads=1": (None, 1, 0),
    "default + 4 workers": (None, None, 4),
    "threads=1 + 4 workers": (None, 1, 4),
    "OMP_WAIT_POLICY=PASSIVE": ("PASSIVE", None, 0),
    "threads=1 + PASSIVE": ("PASSIVE", 1, 0),
    "auto (common.runtime.threads + PASSIVE)": ("PASSIVE", "auto", "auto"),
}

LOADS = {
    "spin": "while True: pass",
    "torch": "import torch\na = torch.randn(256, 256)\nwhile True: a = (a @ a).tanh()",
}


def start_load(kind: str, jobs: int) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    procs = [subprocess.Popen([sys.executable, "-c", LOADS[kind]], env=env) for _ in range(jobs)]
    time.sleep(5 if kind == "torch" else 1)  # let torch import
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def child(names: list[str], args) -> None:
    """The settings of one OMP_WAIT_POLICY, in this process: each timed alone, then beside the load; one JSON
    line per setting. torch threads change in-process; the wait policy cannot (OpenMP read it at start)."""
    sys.path.insert(0, str(ROOT))
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from common.runtime import threads as seggen_threads
    from common.models import tiny
    from common.runtime.quiet import quiet

    quiet()  # no bitsandbytes / DataLoader warnings between the rows

    default_threads = torch.get_num_threads()

    class Crops(torch.utils.data.Dataset):  # decode a real JPEG, a 64×64 crop, to [-1, 1]
        def __len__(self):
            return 10**6

        def __getitem__(self, i):
            img = Image.open(IMAGES[i % len(IMAGES)]).convert("RGB").resize((96, 96))
            x, y = (i * 7) % 32, (i * 13) % 32
            t = torch.frombuffer(bytearray(img.crop((x, y, x + 64, y + 64)).tobytes()), dtype=torch.uint8)
            return t.view(64, 64, 3).permute(2, 0, 1).float() / 127.5 - 1

    torch.manual_seed(0)
    unet, vae = tiny.sdxl_unet(), tiny._vae().requires_grad_(False)
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-5)
    emb, pooled, ids = torch.randn(2, 77, 64), torch.randn(2, 32), torch.zeros(2, 6)

    def seconds_per_step(threads, workers) -> tuple[float, int, int]:
        if threads == "auto":  # decided now, as a stage starting at this moment would
            plan = seggen_threads.configure()
            workers = plan.workers(None)
        else:
            torch.set_num_threads(default_threads if threads is None else threads)
        loader = iter(torch.utils.data.DataLoader(Crops(), batch_size=2, num_workers=workers))
        times = []
        for k in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            images = next(loader)
            with torch.no_grad():
                latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor  # (2, 4, 8, 8)
            noise, t = torch.randn_like(latents), torch.randint(0, 1000, (2,))
            cond = {"text_embeds": pooled, "time_ids": ids}
            F.mse_loss(unet(latents + noise, t, encoder_hidden_states=emb, added_cond_kwargs=cond).sample, noise).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if k >= args.warmup:
                times.append(time.perf_counter() - t0)
        del loader  # its workers exit
        return statistics.median(times), torch.get_num_threads(), workers

    for name in names:
        _, threads, workers = SETTINGS[name]
        alone, n_threads, n_workers = seconds_per_step(threads, workers)
        load_before = os.getloadavg()[0]
        procs = start_load(args.load, args.jobs)
        try:
            loaded, *_ = seconds_per_step(threads, workers)
        finally:
            stop_load(procs)
        print(json.dumps({"name": name, "alone": alone, "loaded": loaded, "threads": n_threads, "workers": n_workers,
                          "load_before": load_before}), flush=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", choices=sorted(LOADS), default="spin")
    ap.add_argument("--jobs", type=int, default=3, help="extra CPU-heavy processes while 'loaded'")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--only", action="append", help="run only these settings (substring of the name)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(json.loads(args.child), args)

    names = [n for n in SETTINGS if not args.only or any(o in n for o in args.only)]
    print(f"tiny SDXL UNet fwd+bwd+AdamW + VAE encode + data, 64x64, batch 2, median of {args.steps} steps; "
          f"{len(os.sched_getaffinity(0))} cores; loaded = {args.jobs} more {args.load} processes; "
          f"load average at start {os.getloadavg()[0]:.1f}")
    print(f"{'setting':<36}{'threads':>8}{'workers':>8}{'alone s':>10}{'loaded s':>10}{'loaded/alone':>14}{'vs default':>12}")
    default = None
    for policy in dict.fromkeys(SETTINGS[n][0] for n in names):
        env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
        env.setdefault("HF_HUB_OFFLINE", "1")
        if policy:
            env["OMP_WAIT_POLICY"] = policy
        mine = [n for n in names if SETTINGS[n][0] == policy]
        cmd = [sys.executable, __file__, "--child", json.dumps(mine), "--steps", str(args.steps), "--warmup", str(args.warmup),
               "--load", args.load, "--jobs", str(args.jobs)]
        with subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True) as proc:
            for line in proc.stdout:
                r = json.loads(line)
                default = default or r["loaded"]
                print(f"{r['name']:<36}{r['threads']:>8}{r['workers']:>8}{r['alone']:>10.3f}{r['loaded']:>10.3f}"
                      f"{r['loaded'] / r['alone']:>13.1f}x{r['loaded'] / default:>11.2f}x", flush=True)
        if proc.returncode:
            raise SystemExit(f"the settings {mine} failed (exit {proc.returncode})")
    print(f"load average at the end {os.getloadavg()[0]:.1f}; 'vs default': loaded time / the first row's loaded time")


if __name__ == "__main__":
    main()
