"""Kill soak of every resumable stage (issue 16): run each stage with tiny models and settings, kill -9 it
at random moments while it works, rerun until it finishes, then compare with an uninterrupted run.

    HF_HUB_OFFLINE=1 nice -n 10 python bench/killsoak.py --kills 20
    python bench/killsoak.py --kills 5 --stages caption,train_seg

A kill counts as landed when the process was alive, had written something in this attempt (a manifest
line, a checkpoint) and had not finished. The stages and what "identical" means:

    caption, imgsyn, masksyn      the same ids, none twice, identical bytes of every line and sample file
    train_text2mask, train_mask2img, train_seg (--resume latest)
                                  every saved weight within 1e-6 of the uninterrupted run's

Each run has about 2 x --kills + 4 units of work (images, samples, optimizer steps with a checkpoint
after each), so that the kills land before the job is done. Prints one row per stage: kills landed,
attempts, result; exit code 1 if any stage differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
ADE = ROOT / "tests/data/ade20k"
STAGES = ["caption", "imgsyn", "masksyn", "train_text2mask", "train_mask2img", "train_seg"]


# ---------------------------------------------------------------- the inputs

def ade_root(folder: Path, n: int) -> Path:
    """An ADE20K root whose val split holds n samples: copies of the two real ones under new ids."""
    src = ADE / "ADEChallengeData2016"
    for kind in ("images", "annotations"):
        (folder / "ADEChallengeData2016" / kind / "validation").mkdir(parents=True, exist_ok=True)
        shutil.copytree(src / kind / "training", folder / "ADEChallengeData2016" / kind / "training", dirs_exist_ok=True)
    for i in range(n):
        real = f"ADE_val_{i % 2 + 1:08d}"
        for kind, ext in (("images", "jpg"), ("annotations", "png")):
            shutil.copy(src / kind / "validation" / f"{real}.{ext}", folder / "ADEChallengeData2016" / kind / "validation" / f"ADE_val_{i + 1:08d}.{ext}")
    return folder


def captions(path: Path, root: Path) -> Path:
    ids = sorted(p.stem for p in (root / "ADEChallengeData2016/images/validation").glob("*.jpg"))
    with open(path, "w") as f:
        for n, i in enumerate(ids):
            f.write(json.dumps({"id": i, "image": f"ADEChallengeData2016/images/validation/{i}.jpg",
                                "caption": ["a room with a bed", "a street with cars"][n % 2] + f" {n}"}) + "\n")
    return path


# ---------------------------------------------------------------- what a stage writes and how runs compare

def manifest_lines(out: Path) -> list[bytes]:
    files = [out] if out.suffix == ".jsonl" else sorted(out.glob("manifest*.jsonl"))
    return [line for f in files if f.is_file() for line in f.read_bytes().splitlines(keepends=True)]


def generated(out: Path) -> int:
    """Progress of a generation stage: complete manifest lines (0 before the output exists)."""
    return sum(line.endswith(b"\n") for line in manifest_lines(out)) if out.exists() else 0


def checkpoints(out: Path) -> tuple:
    """Progress of a trainer: the names of its complete checkpoint folders (those with their marker,
    written last: checkpoint.json for the generator trainers, state.json for train_seg)."""
    found = list(out.glob("checkpoint-*")) + list(out.glob("checkpoints/*"))
    return tuple(sorted(p.name for p in found if not p.name.startswith(".")
                        and ((p / "checkpoint.json").is_file() or (p / "state.json").is_file())))


def same_samples(ref: Path, soak: Path) -> str | None:
    """None when the two outputs hold the same lines (by id, each once) and identical sample files."""
    lines = {}
    for name, out in (("reference", ref), ("soak", soak)):
        recs = [json.loads(x) for x in manifest_lines(out)]
        ids = [r["id"] for r in recs]
        if len(ids) != len(set(ids)):
            return f"{name}: {len(ids) - len(set(ids))} duplicate id(s)"
        lines[name] = {r["id"]: r for r in recs}
    if lines["reference"].keys() != lines["soak"].keys():
        return f"ids differ: {sorted(lines['reference'].keys() ^ lines['soak'].keys())[:3]}"
    for sid, rec in lines["reference"].items():
        if rec != lines["soak"][sid]:
            return f"line {sid} differs"
    if ref.is_dir():
        for p in sorted(ref.rglob("*")):
            rel = p.relative_to(ref)
            if p.is_file() and rel.parts[0] in ("images", "annotations", "colormaps"):
                q = soak / rel
                if not q.is_file() or q.read_bytes() != p.read_bytes():
                    return f"{rel} differs"
    return None


def same_weights(ref: Path, soak: Path, tol: float = 1e-6) -> str | None:
    """None when every *.safetensors of the final model (checkpoints aside) agrees within tol."""
    from safetensors.torch import load_file

    def models(out):
        return sorted(p.relative_to(out) for p in out.rglob("*.safetensors")
                      if not any(part.startswith(("checkpoint", ".partial")) for part in p.relative_to(out).parts))

    names = models(ref)
    if not names or names != models(soak):
        return f"weight files differ: {names} vs {models(soak)}"
    worst = 0.0
    for name in names:
        a, b = load_file(ref / name), load_file(soak / name)
        if a.keys() != b.keys():
            return f"{name}: other tensors"
        for k in a:
            if a[k].is_floating_point():
                worst = max(worst, float((a[k].double() - b[k].double()).abs().max()))
            elif not (a[k] == b[k]).all():
                return f"{name}:{k} differs"
    return None if worst <= tol else f"max |difference| {worst:.3g} > {tol}"


@dataclass
class Stage:
    name: str
    argv: object  # argv(out, resumed) -> the command line
    progress: object  # progress(out) -> a value that changes when the stage writes a unit of work
    compare: object  # compare(reference out, soaked out) -> None or what differs
    out_name: str = "out"


def stages(work: Path, units: int) -> dict[str, Stage]:
    from common.models import tiny

    models = work / "models"
    built = {}

    def model(kind):
        if kind not in built:
            built[kind] = str(tiny.save(kind, models / kind, model("sdxl") if kind == "controlnet" else None))
        return built[kind]

    root = ade_root(work / "ade", units)
    caps = captions(work / "captions.jsonl", root)
    half = max(2, (units + 1) // 2)  # imgsyn / masksyn: half the sources, 2 samples each
    py = [sys.executable]
    caps2 = captions(work / "captions2.jsonl", ADE)
    trainer = lambda script, out, resumed: [*py, str(ROOT / script), "--data-root", str(ADE), "--split", "val",
                                            "--captions", str(caps2), "--pretrained", model("sdxl"),
                                            "--output-dir", str(out), "--resolution", "64", "--batch-size", "2", "--num-workers", "0",
                                            "--max-steps", str(units), "--checkpointing-steps", "1", "--checkpoints-total-limit", "2",
                                            "--validation-steps", "0", "--report-to", "none",
                                            *(["--resume", "latest"] if resumed else [])]
    return {
        "caption": Stage("caption", lambda out, resumed: [*py, str(ROOT / "caption.py"), "--data-root", str(root), "--split", "val",
                                                           "--model", model("blip2"), "--max-new-tokens", "4", "--batch-size", "1",
                                                           "--num-workers", "0", "--out", str(out)],
                         generated, same_samples, "captions.jsonl"),
        "imgsyn": Stage("imgsyn", lambda out, resumed: [*py, str(ROOT / "imgsyn.py"), "--data-root", str(root), "--split", "val",
                                                         "--captions", str(caps), "--limit", str(half), "--mask2img", model("controlnet"),
                                                         "--base", model("sdxl"), "--per-sample", "2", "--batch-size", "1", "--steps", "2",
                                                         "--resolution", "64", "--out", str(out)],
                        generated, same_samples),
        "masksyn": Stage("masksyn", lambda out, resumed: [*py, str(ROOT / "masksyn.py"), "--captions", str(caps), "--limit", str(half),
                                                           "--text2mask", model("sdxl"), "--mask2img", model("controlnet"), "--base", model("sdxl"),
                                                           "--per-sample", "2", "--batch-size", "1", "--text2mask-steps", "2",
                                                           "--mask2img-steps", "2", "--resolution", "64", "--max-off-palette", "1.0",
                                                           "--out", str(out)],
                         generated, same_samples),
        "train_text2mask": Stage("train_text2mask", lambda out, resumed: trainer("train_text2mask.py", out, resumed), checkpoints, same_weights),
        "train_mask2img": Stage("train_mask2img", lambda out, resumed: trainer("train_mask2img.py", out, resumed), checkpoints, same_weights),
        "train_seg": Stage("train_seg", lambda out, resumed: [*py, str(ROOT / "train_seg.py"), "--data-root", str(ADE), "--strategy", "real",
                                                               "--model", model("mask2former"), "--batch-size", "2", "--crop", "64",
                                                               "--num-workers", "0", "--max-steps", str(units), "--checkpoint-every", "1",
                                                               "--eval-size", "32", "--log-every", "1", "--output-dir", str(out),
                                                               *(["--resume", "latest"] if resumed else [])],
                           checkpoints, same_weights),
    }


# ---------------------------------------------------------------- the soak

def soak(stage: Stage, work: Path, kills: int, rng: random.Random, say) -> dict:
    ref, out, log = work / "ref" / stage.out_name, work / "soak" / stage.out_name, work / "log.txt"
    proc = subprocess.Popen(stage.argv(ref, False), stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    changes, last = [], None
    while proc.poll() is None:  # the uninterrupted run, timing each unit of work it writes
        time.sleep(0.02)
        now = stage.progress(ref)
        if now != last:
            changes.append(time.perf_counter())
            last = now
    if proc.wait() != 0:
        return {"landed": 0, "attempts": 0, "result": f"reference run failed (exit {proc.returncode}; see {log})"}
    gaps = sorted(b - a for a, b in zip(changes[1:], changes[2:]))
    per_unit = gaps[len(gaps) // 2] if gaps else 1.0  # the median time between two units
    landed, attempts = 0, 0
    while True:
        attempts += 1
        before = stage.progress(out)
        # what a user does: --resume latest once a complete checkpoint exists, else the same command anew
        resumed = stage.progress is not checkpoints or bool(before)
        proc = subprocess.Popen(stage.argv(out, resumed), stdout=open(log, "ab"), stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
        kill_at, seen = None, None
        while proc.poll() is None:
            time.sleep(0.02)
            if landed >= kills:
                continue  # enough kills: let this attempt finish
            now = stage.progress(out)
            if kill_at is None and now != before:  # it wrote something in this attempt: kill within the next unit or so
                seen = time.perf_counter()
                kill_at = seen + rng.uniform(0, per_unit)
            if kill_at is not None and time.perf_counter() >= kill_at:
                if proc.poll() is None:
                    os.kill(proc.pid, signal.SIGKILL)
                    proc.wait()
                    landed += 1
                break
        rc = proc.wait()
        if rc == -signal.SIGKILL:
            continue
        if rc != 0:
            return {"landed": landed, "attempts": attempts, "result": f"attempt {attempts} failed (exit {rc}; see {log})"}
        break  # finished
    differs = stage.compare(ref, out)
    return {"landed": landed, "attempts": attempts, "result": "identical" if differs is None else f"DIFFERS: {differs}"}


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kills", type=int, default=20, help="kills that must land mid-run, per stage (default 20)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"comma-separated, of {','.join(STAGES)}")
    ap.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    ap.add_argument("--keep", action="store_true", help="keep the work folder (printed)")
    a = ap.parse_args()
    wanted = [s.strip() for s in a.stages.split(",") if s.strip()]
    unknown = set(wanted) - set(STAGES)
    if unknown:
        ap.error(f"--stages: unknown {sorted(unknown)}; choose from {','.join(STAGES)}")
    work = Path(tempfile.mkdtemp(prefix="killsoak-"))
    rng = random.Random(a.seed)
    table = stages(work, units=2 * a.kills + 4)
    rows = []
    print(f"{'stage':16s} {'kills landed':>12s} {'attempts':>8s} {'seconds':>8s}  result", flush=True)
    for name in wanted:
        (work / name).mkdir()
        t = time.perf_counter()
        r = soak(table[name], work / name, a.kills, rng, print)
        rows.append((name, r))
        print(f"{name:16s} {r['landed']:>12d} {r['attempts']:>8d} {time.perf_counter() - t:>8.0f}  {r['result']}", flush=True)
    if a.keep:
        print(f"work folder: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if all(r["result"] == "identical" and r["landed"] >= a.kills for _, r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
