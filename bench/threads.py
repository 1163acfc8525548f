"""A tiny trainer step alone and beside CPU-heavy jobs, for several thread / worker settings, in one run.

Issue 17 item 9: under a load average of 5–7 on 2 cores the demo's trainers took ~13 s per tiny step
against ~0.7 s alone. This bench finds which setting turns 3× contention into 20×.

- step: the tiny SDXL UNet (common/tiny.py) forward+backward + AdamW on latents of the tiny VAE, 64×64
  images, batch 2, read and cropped from the real ADE20K samples through a DataLoader; like
  bench/train_step.py's "bare+VAE" plus the data.
- settings: each runs in a fresh process (OpenMP reads OMP_WAIT_POLICY when torch first starts its pool):
  torch threads = all cores (torch's default) or 1; OMP_WAIT_POLICY unset or PASSIVE; DataLoader
  workers 0 or 4; and "auto", what common/threads.py picks.
- load: N extra processes, each busy (`spin`: a pure Python loop, one core each) or each a torch job
  with torch's default threads (`torch`: matmuls of 256×256, like another trainer or test suite).

Prints seconds per step (median after warm-up) alone and loaded, and the ratio loaded / alone. The
machine may carry other load than ours: `uptime` is printed first; read the ratios, and the spread
between settings, not the absolute times.

    python bench/threads.py [--load spin|torch] [--jobs 3] [--steps 12]
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

# name: (torch threads: None = torch's default, "auto" = common.threads; OMP_WAIT_POLICY; DataLoader workers)
SETTINGS = {
    "default (threads=cores, 0 workers)": (None, None, 0),
    "threads=1": (1, None, 0),
    "OMP_WAIT_POLICY=PASSIVE": (None, "PASSIVE", 0),
    "threads=1 + PASSIVE": (1, "PASSIVE", 0),
    "default + 4 workers": (None, None, 4),
    "threads=1 + 4 workers": (1, None, 4),
    "auto (common.threads)": ("auto", None, "auto"),
}

LOADS = {
    "spin": "while True: pass",
    "torch": "import torch\na = torch.randn(256, 256)\nwhile True: a = (a @ a).tanh()",
}


def child(threads, workers, steps: int, warmup: int) -> None:
    """One setting: time `steps` training steps after `warmup`, print JSON {seconds, threads, workers}."""
    sys.path.insert(0, str(ROOT))
    if threads == "auto":
        from common import threads as seggen_threads

        plan = seggen_threads.configure()
        workers = plan.workers(None)
    import torch
    import torch.nn.functional as F
    from PIL import Image

    from common import tiny

    if threads not in (None, "auto"):
        torch.set_num_threads(int(threads))

    class Crops(torch.utils.data.Dataset):  # decode a real JPEG, random 64×64 crop, to [-1, 1]
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
    loader = iter(torch.utils.data.DataLoader(Crops(), batch_size=2, num_workers=int(workers)))
    emb, pooled, ids = torch.randn(2, 77, 64), torch.randn(2, 32), torch.zeros(2, 6)

    def step():
        images = next(loader)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.sample() * vae.config.scaling_factor  # (2, 4, 8, 8)
        noise, t = torch.randn_like(latents), torch.randint(0, 1000, (2,))
        pred = unet(latents + noise, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample
        F.mse_loss(pred, noise).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    times = []
    for k in range(warmup + steps):
        t0 = time.perf_counter()
        step()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    print(json.dumps({"seconds": statistics.median(times), "threads": torch.get_num_threads(), "workers": int(workers),
                      "wait_policy": os.environ.get("OMP_WAIT_POLICY", "")}))


def run_setting(name: str, steps: int, warmup: int) -> dict:
    threads, policy, workers = SETTINGS[name]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    if policy:
        env["OMP_WAIT_POLICY"] = policy
    cmd = [sys.executable, __file__, "--child", json.dumps([threads, workers]), "--steps", str(steps), "--warmup", str(warmup)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{name} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_load(kind: str, jobs: int) -> list[subprocess.Popen]:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "OMP_NUM_THREADS")}
    procs = [subprocess.Popen([sys.executable, "-c", LOADS[kind]], env=env) for _ in range(jobs)]
    time.sleep(3 if kind == "torch" else 0.5)  # let torch import
    return procs


def stop_load(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--load", choices=sorted(LOADS), default="spin")
    ap.add_argument("--jobs", type=int, default=3, help="extra CPU-heavy processes while 'loaded'")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--only", action="append", help="run only these settings (substring of the name)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        threads, workers = json.loads(args.child)
        return child(threads, workers, args.steps, args.warmup)

    names = [n for n in SETTINGS if not args.only or any(o in n for o in args.only)]
    cores = len(os.sched_getaffinity(0))
    print(f"tiny SDXL UNet step + VAE encode + data, 64x64, batch 2, median of {args.steps}; {cores} cores; "
          f"load: {args.jobs} x {args.load}; before: {os.getloadavg()[0]:.1f} load average")
    print(f"{'setting':<36}{'threads':>8}{'workers':>8}{'alone s':>10}{'loaded s':>10}{'loaded/alone':>14}")
    for name in names:
        alone = run_setting(name, args.steps, args.warmup)
        procs = start_load(args.load, args.jobs)
        try:
            loaded = run_setting(name, args.steps, args.warmup)
        finally:
            stop_load(procs)
        print(f"{name:<36}{alone['threads']:>8}{alone['workers']:>8}{alone['seconds']:>10.3f}{loaded['seconds']:>10.3f}"
              f"{loaded['seconds'] / alone['seconds']:>13.1f}x", flush=True)
    print(f"after: {os.getloadavg()[0]:.1f} load average")


if __name__ == "__main__":
    main()
