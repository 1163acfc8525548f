"""Paper-scale readers: seconds and peak memory per million manifest lines (issue 18 items 1, 2, 4).

Generates a synthetic folder of N manifest lines in imgsyn's COCO format (the largest: ~25
segments_info entries a line, split over 2 rank files) and a COCO-panoptic-like split (JSON with ~11
segments per image, empty image/PNG files), then measures each reader in a fresh process (peak RSS =
VmHWM) and prints the new path against the code it replaces, measured in the same run:

- resume: manifest.read_ids (streaming ids)        vs done_ids (every record parsed and kept)
- index:  index.synthetic_index, build and cached  vs read_synthetic's record list; and train_seg's
          --synthetic FOLDER:k on it (index.first_per_source: SyntheticIndex.provenance, then a view)
- worker: a forked DataLoader worker touching its quarter of the samples, then gc.collect();
          private memory (Private_* in /proc/self/smaps_rollup)
- coco:   datasets.coco_panoptic_index, first and cached, vs the JSON parsed on every call
- json:   synth.write_coco_panoptic_json (the end of a COCO imgsyn/masksyn run), written sample by sample
          through the index, vs the whole document built from read_synthetic and dumped at once (every
          line's image and panoptic PNG are hard links to one 640 x 480 pair)
- tasks:  the sharded case (issue 26): the same lines written by --tasks N independent tasks
          (manifest.shard{I}-of-{N}.jsonl, imgsyn's batches striped over the tasks); what one task reads at
          start to resume its share (the plan, then read_ids of its share from the files whose shares meet
          its own) at the same N and after a change of N (every file meets it), against the old start-up
          of every process (read_ids of the whole folder); and `python -m common.synthesis.finalize` (index,
          COCO JSON, stamp) once after the tasks

The old paths keep every record as Python objects (~6 GB per million lines), so they run on at most
--baseline-lines lines (default 100k) and are scaled per million; the new ones run on all N lines.

    python bench/scale.py                       # ~2 minutes: 50k lines, 10k COCO images
    nice -n 10 python bench/scale.py --lines 1200000 --coco-images 118000   # the paper-scale target
    nice -n 19 python bench/scale.py --lines 1200000 --tasks 64 --only-tasks   # the sharded case alone (docs/many-machines.md)
Targets at 1.2 M lines: resume <= 10 s and <= 300 MB; index <= 20 s and <= 1 GB, <= 100 MB private per
worker; COCO 118k <= 5 s and <= 300 MB once cached.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# ---------------------------------------------------------------- defaults (see the module doc)
LINES = 50_000  # manifest lines (paper: 1.2 M for ADE20K, 1.18 M for COCO)
COCO_IMAGES = 10_000  # COCO panoptic images (paper: train2017, 118k)
BASELINE_LINES = 100_000  # the old, record-keeping readers run on at most this many lines
TASKS = 64  # independent tasks of the sharded case (issue 26: 64 GPUs)
PER_SAMPLE, BATCH = 10, 4  # the bench's lines: 10 samples per source, imgsyn's default batch
SEGMENTS_PER_LINE = 25  # imgsyn COCO lines (issue 18)
SEGMENTS_PER_IMAGE = 11  # COCO panoptic train2017's mean
WORKERS = 4  # a worker touches 1/WORKERS of the samples


# ---------------------------------------------------------------- data in the real formats

def imgsyn_line(sid: str, source: str, k: int, segments: list) -> str:
    """One manifest line as imgsyn.py writes it (synth.sample_record + segments_info)."""
    settings = {"data": "coco", "resolution": 768, "steps": 50, "guidance": 7.5, "sampler": "heun", "S_churn": 0,
                "S_tmin": 0, "S_tmax": None, "S_noise": 1, "seed": 0, "precision": "bf16", "palette": "coco-generation"}
    models = {"mask2img": "runs/mask2img-coco", "base": "stabilityai/stable-diffusion-xl-base-1.0",
              "vae": "madebyollin/sdxl-vae-fp16-fix"}
    rec = {"id": sid, "source_id": source, "k": k, "method": "imgsyn", "image": f"images/{sid}.jpg",
           "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png",
           "caption": "a man riding a bike down a street next to a parked car and a bus", "seed": 4242424242424242,
           "settings": settings, "models": models, "batch": [[source, kk] for kk in range(8)], "segments_info": segments}
    return json.dumps(rec, ensure_ascii=False)


CATEGORIES = [c["id"] for c in json.loads((ROOT / "common/assets/coco_panoptic_categories.json").read_text())]


def segments(n: int, seed: int) -> list:
    return [{"id": 3937500 + 997 * i + seed % 1000, "category_id": CATEGORIES[(seed + i) % len(CATEGORIES)], "iscrowd": 0,
             "bbox": [12 + i, 34, 200, 150], "area": 12345 + i} for i in range(n)]


def write_folder(folder: Path, lines: int, ranks: int = 2) -> None:
    folder.mkdir(parents=True)
    files = [open(folder / f"manifest.rank{r}.jsonl", "w", encoding="utf-8") for r in range(ranks)]
    for i in range(lines):
        source = f"{i // 10:012d}"
        files[i % ranks].write(imgsyn_line(f"{source}_{i % 10:03d}", source, i % 10, segments(SEGMENTS_PER_LINE, i)) + "\n")
    for f in files:
        f.close()


def write_task_folder(folder: Path, lines: int, tasks: int) -> None:
    """The lines of write_folder as `tasks` independent imgsyn tasks write them: batch b (BATCH samples in
    plan order) in task b % tasks's manifest.shard{I}-of-{N}.jsonl. Manifests only (start-up reads no file)."""
    folder.mkdir(parents=True)
    files = [open(folder / f"manifest.shard{t}-of-{tasks}.jsonl", "w", encoding="utf-8") for t in range(tasks)]
    for i in range(lines):
        source = f"{i // PER_SAMPLE:012d}"
        line = imgsyn_line(f"{source}_{i % PER_SAMPLE:03d}", source, i % PER_SAMPLE, segments(SEGMENTS_PER_LINE, i))
        files[(i // BATCH) % tasks].write(line + "\n")
    for f in files:
        f.close()


def task_start(folder: Path, lines: int, index: int, count: int) -> int:
    """What imgsyn's task `index` of `count` does at start to resume (imgsyn.py): its share of the plan,
    then the ids of that share already written, from the files whose shares meet it. Returns how many."""
    from common.data.manifest import read_ids
    from common.runtime.shard import Task
    from common.synthesis import synth

    sources = [f"{s:012d}" for s in range(-(-lines // PER_SAMPLE))]
    mine = synth.shard(synth.plan_batches(sources, PER_SAMPLE, BATCH), Task(index, count, "cpu"))
    return len(read_ids(folder, synth.share_ids(mine), (index, count)))


def link_files(folder: Path, lines: int, per_file: int = 60_000) -> None:
    """images/ID.jpg and annotations/ID.png for every line of write_folder: hard links to a real pair, a new
    copy of it every `per_file` lines (ext4 allows 65,000 links to a file)."""
    from PIL import Image

    for sub in ("images", "annotations"):
        (folder / sub).mkdir()
    for i in range(lines):
        jpg, png = folder / f"pair{i // per_file}.jpg", folder / f"pair{i // per_file}.png"
        if i % per_file == 0:
            Image.new("RGB", (640, 480), (40, 80, 120)).save(jpg)
            Image.new("RGB", (640, 480), (1, 0, 0)).save(png)
        sid = f"{i // 10:012d}_{i % 10:03d}"
        os.link(jpg, folder / f"images/{sid}.jpg")
        os.link(png, folder / f"annotations/{sid}.png")


def old_coco_json(out: Path) -> Path:
    """synth.write_coco_panoptic_json as it was: every sample from read_synthetic, one document, one dump."""
    from PIL import Image

    from common.masks.colormap import coco_categories
    from common.data.datasets import read_synthetic

    images, annotations = [], []
    for image_id, sample in enumerate(sorted(read_synthetic(out), key=lambda x: x.id), start=1):
        with Image.open(sample.annotation) as im:
            width, height = im.size
        images.append({"id": image_id, "file_name": sample.image.name, "width": width, "height": height})
        annotations.append({"image_id": image_id, "file_name": sample.annotation.name, "segments_info": sample.segments})
    doc = {"images": images, "annotations": annotations,
           "categories": [{k: c[k] for k in ("id", "name", "isthing", "color") if k in c} for c in coco_categories()]}
    path = out / "panoptic_old.json"
    path.write_text(json.dumps(doc))
    return path


def write_coco(root: Path, images: int) -> None:
    (root / "annotations/panoptic_val2017").mkdir(parents=True)
    (root / "val2017").mkdir()
    meta = {"info": {}, "licenses": [], "categories": json.loads((ROOT / "common/assets/coco_panoptic_categories.json").read_text()),
            "images": [], "annotations": []}
    for i in range(images):
        name = f"{i:012d}"
        meta["images"].append({"id": i, "file_name": f"{name}.jpg", "width": 640, "height": 480})
        meta["annotations"].append({"image_id": i, "file_name": f"{name}.png", "segments_info": segments(SEGMENTS_PER_IMAGE, i)})
        (root / f"val2017/{name}.jpg").touch()
        (root / f"annotations/panoptic_val2017/{name}.png").touch()
    (root / "annotations/panoptic_val2017.json").write_text(json.dumps(meta))


# ---------------------------------------------------------------- measurements (each in a fresh process)

def _status(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024  # MB
    return 0.0


def _load() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def _private_mb() -> float:
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rollup if line.startswith("Private_")) / 1024


def old_synthetic(folder: Path) -> list:
    """read_synthetic as it was before the index: every record validated and kept in a Sample."""
    from common.data.datasets import Sample
    from common.data.manifest import SYNTHETIC_FIELDS, read_manifest

    records = read_manifest(folder, required=SYNTHETIC_FIELDS, path_fields=("image", "annotation", "colormap"))
    return [Sample(r["id"], folder / r["image"], folder / r["annotation"], segments=r.get("segments_info"), meta=r)
            for r in records]


def _touch_share(samples, materialise) -> None:
    """What a DataLoader worker does to the shared list/index over an epoch: reads its share."""
    n = len(samples)
    for i in range(0, n // WORKERS):
        materialise(samples, i)


def _fork_worker(samples, materialise) -> tuple[float, float]:
    """Private MB and CPU seconds of a forked child after touching its share and a full garbage collection."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _touch_share(samples, materialise)
        gc.collect()
        os.write(w, f"{_private_mb():.1f} {time.process_time():.3f}".encode())
        os._exit(0)
    os.close(w)
    got = os.read(r, 100).decode().split()
    os.waitpid(pid, 0)
    return float(got[0]), float(got[1])


def measure(name: str, path: Path) -> dict:
    from common.data import index as idx
    from common.data.datasets import _read_coco_panoptic_json, coco_panoptic_index
    from common.data.manifest import done_ids, read_ids

    start, cpu, extra = time.perf_counter(), time.process_time(), {}
    if name == "empty":
        pass
    elif name == "resume_new":
        extra["n"] = len(read_ids(path))
    elif name == "resume_old":
        extra["n"] = len(done_ids(path))
    elif name in ("index_build", "index_cached"):
        if name == "index_build":
            (path / ".index.npz").unlink(missing_ok=True)
        extra["n"] = len(idx.synthetic_index(path))
    elif name == "index_firstk":  # train_seg --synthetic FOLDER:k on the index: one provenance pass, a view
        index = idx.synthetic_index(path)
        start, cpu = time.perf_counter(), time.process_time()
        extra["n"] = len(idx.first_per_source(index, 1))
    elif name == "index_old":
        extra["n"] = len(old_synthetic(path))
    elif name == "worker_new":
        index = idx.synthetic_index(path)
        start, cpu = time.perf_counter(), time.process_time()

        def touch(ix, i):  # the arrays a worker reads for every sample, and a full record for some
            ix.ids[i], int(ix.line_off[i]), int(ix.file_no[i]), int(ix.line_no[i])
            if i % 50 == 0:
                ix.record(i)
        extra["private_mb"], extra["cpu_s"] = _fork_worker(index, touch)
    elif name == "worker_old":
        samples = old_synthetic(path)
        start, cpu = time.perf_counter(), time.process_time()

        def touch(ss, i):
            s = ss[i]
            s.id, s.image, s.annotation, s.meta["caption"]
        extra["private_mb"], extra["cpu_s"] = _fork_worker(samples, touch)
    elif name in ("coco_first", "coco_cached"):
        if name == "coco_first":
            for p in path.glob("annotations/.*.index.npz"):
                p.unlink()
        extra["n"] = len(coco_panoptic_index(path, "val"))
    elif name == "coco_old":
        extra["n"] = len(_read_coco_panoptic_json(path, "val"))
    elif name == "json_new":
        from common.synthesis import synth

        idx.synthetic_index(path)  # as train_seg or a resume left it: the index is cached (its build is the index row)
        start, cpu = time.perf_counter(), time.process_time()
        extra["mb_written"] = synth.write_coco_panoptic_json(path).stat().st_size / 1e6
    elif name == "json_old":
        from common.synthesis import synth  # noqa: F401  (the old function lived there: the same imports as json_new)

        start, cpu = time.perf_counter(), time.process_time()
        extra["mb_written"] = old_coco_json(path).stat().st_size / 1e6
    elif name == "empty_stage":  # a bare process with a stage's imports (torch, diffusers): every task pays it
        from common.synthesis import finalize, synth  # noqa: F401
    elif name.startswith("task_"):  # task_INDEX_COUNT: one task's start-up on the folder of --tasks tasks
        from common.synthesis import synth  # noqa: F401  (imported by the stage anyway: not the read's time)

        _, index, count = name.split("_")
        lines = sum(1 for f in path.glob("manifest*.jsonl") for _ in open(f, "rb"))
        start, cpu = time.perf_counter(), time.process_time()
        extra["n"] = task_start(path, lines, int(index), int(count))
    elif name == "finalize":
        from common.synthesis import finalize, synth  # noqa: F401

        for p in (path / ".index.npz", path / ".finalized.json"):
            p.unlink(missing_ok=True)
        start, cpu = time.perf_counter(), time.process_time()
        extra["samples"] = finalize.finalize(path)["samples"]
    else:
        raise SystemExit(f"unknown measurement {name}")
    return {"seconds": time.perf_counter() - start, "cpu_s": time.process_time() - cpu, "peak_mb": _status("VmHWM:"),
            **extra}  # a worker row's cpu_s is the forked child's


def run(name: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--measure", name, "--path", str(path)], capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--lines", type=int, default=LINES)
    ap.add_argument("--coco-images", type=int, default=COCO_IMAGES)
    ap.add_argument("--baseline-lines", type=int, default=BASELINE_LINES)
    ap.add_argument("--tasks", type=int, default=TASKS, help="independent tasks of the sharded case (default: %(default)s)")
    ap.add_argument("--only-tasks", action="store_true", help="measure the sharded case alone (start-up reads, finalize)")
    ap.add_argument("--keep", type=Path, default=None, help="write the data here and keep it (default: a temporary folder)")
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.measure:
        print(json.dumps(measure(a.measure, a.path)))
        return

    work = a.keep or Path(tempfile.mkdtemp(prefix="seggen-scale-"))
    try:
        base_lines, base_coco = min(a.lines, a.baseline_lines), min(a.coco_images, a.baseline_lines)
        t = time.perf_counter()
        write_folder(work / "synth", a.lines)
        link_files(work / "synth", a.lines)
        write_task_folder(work / "synth_tasks", a.lines, a.tasks)
        if a.only_tasks:
            tasks_case(work, a.lines, a.tasks)
            return
        if base_lines < a.lines:
            write_folder(work / "synth_base", base_lines)
            link_files(work / "synth_base", base_lines)
        else:
            (work / "synth_base").symlink_to(work / "synth")
        write_coco(work / "coco", a.coco_images)
        size = sum(p.stat().st_size for p in (work / "synth").glob("*.jsonl")) / 1e6
        print(f"data: {a.lines} manifest lines ({size:.0f} MB, COCO format with {SEGMENTS_PER_LINE} segments), "
              f"{a.coco_images} COCO images; written in {time.perf_counter() - t:.0f} s under {work}", flush=True)
        empty = run("empty", work)["peak_mb"]
        print(f"(a bare process: {empty:.0f} MB; 'MB/M' is peak minus that, per million lines or images)\n")
        print(f"load average {_load()} on {os.cpu_count()} cores ('cpu s': this process's CPU time, what the "
              f"wall-clock 's' would be alone on a core)\n")
        print(f"{'measure':<26}{'lines':>9}{'s':>9}{'cpu s':>9}{'s/M':>9}{'peak MB':>9}{'MB/M':>9}{'private MB':>12}")

        def show(label, name, path, n):
            r = run(name, path)
            per = 1e6 / n
            priv = f"{r['private_mb']:>12.0f}" if "private_mb" in r else ""
            print(f"{label:<26}{n:>9}{r['seconds']:>9.2f}{r['cpu_s']:>9.2f}{r['seconds'] * per:>9.1f}{r['peak_mb']:>9.0f}"
                  f"{(r['peak_mb'] - empty) * per:>9.0f}{priv}", flush=True)
            return {**r, "s_per_M": r["seconds"] * per, "mb_per_M": (r["peak_mb"] - empty) * per,
                    "private_per_M": r.get("private_mb", 0) * per}

        rows = {}
        rows["resume_new"] = show("resume: read_ids", "resume_new", work / "synth", a.lines)
        rows["resume_old"] = show("resume: done_ids (old)", "resume_old", work / "synth_base", base_lines)
        rows["index_build"] = show("index: build", "index_build", work / "synth", a.lines)
        rows["index_cached"] = show("index: cached load", "index_cached", work / "synth", a.lines)
        rows["index_firstk"] = show("index: FOLDER:k view", "index_firstk", work / "synth", a.lines)
        rows["index_old"] = show("read_synthetic (old)", "index_old", work / "synth_base", base_lines)
        rows["worker_new"] = show("worker: index share", "worker_new", work / "synth", a.lines)
        rows["worker_old"] = show("worker: list share (old)", "worker_old", work / "synth_base", base_lines)
        rows["coco_first"] = show("coco: index, first", "coco_first", work / "coco", a.coco_images)
        rows["coco_cached"] = show("coco: index, cached", "coco_cached", work / "coco", a.coco_images)
        if base_coco < a.coco_images:
            shutil.rmtree(work / "coco")
            write_coco(work / "coco", base_coco)
        rows["coco_old"] = show("coco: JSON (old)", "coco_old", work / "coco", base_coco)
        rows["json_new"] = show("json: streamed", "json_new", work / "synth", a.lines)
        rows["json_old"] = show("json: one document (old)", "json_old", work / "synth_base", base_lines)

        print("\nold / new, per million lines (seconds; memory above a bare process):")
        for what, new, old in (("resume", "resume_new", "resume_old"), ("index (cached)", "index_cached", "index_old"),
                               ("index (build)", "index_build", "index_old"), ("coco (cached)", "coco_cached", "coco_old"),
                               ("coco json", "json_new", "json_old")):
            n, o = rows[new], rows[old]
            print(f"  {what:<16} time {o['s_per_M'] / max(n['s_per_M'], 1e-9):7.1f}x   memory "
                  f"{o['mb_per_M'] / max(n['mb_per_M'], 1e-9):7.1f}x")
        n, o = rows["worker_new"], rows["worker_old"]
        print(f"  {'worker private':<16} memory {o['private_per_M'] / max(n['private_per_M'], 1e-9):7.1f}x")
        cpu = {k: r["cpu_s"] / r["seconds"] * r["s_per_M"] for k, r in rows.items()}  # CPU seconds per million
        print(f"\nat 1.2 M lines / 118k COCO images, scaled linearly from the rows above (targets; cpu: the same alone on a core; at small --lines fixed costs inflate the MB):")
        print(f"  resume  {rows['resume_new']['s_per_M'] * 1.2:6.1f} s, cpu {cpu['resume_new'] * 1.2:.1f} s (<= 10), "
              f"{empty + rows['resume_new']['mb_per_M'] * 1.2:6.0f} MB (<= 300)")
        print(f"  index   {rows['index_build']['s_per_M'] * 1.2:6.1f} s build, cpu {cpu['index_build'] * 1.2:.1f} s, "
              f"{rows['index_cached']['s_per_M'] * 1.2:.1f} s cached (<= 20), {empty + rows['index_build']['mb_per_M'] * 1.2:6.0f} MB (<= 1000)")
        print(f"  worker  {rows['worker_new']['private_mb']:6.0f} MB private at {a.lines} lines (<= 100; mostly the "
              f"interpreter's own pages, not per sample)")
        print(f"  coco    {rows['coco_cached']['s_per_M'] * 0.118:6.1f} s cached, {empty + rows['coco_cached']['mb_per_M'] * 0.118:6.0f} MB (<= 5 s, 300 MB)")
        print(f"  json    {rows['json_new']['s_per_M'] * 1.2:6.1f} s, {empty + rows['json_new']['mb_per_M'] * 1.2:6.0f} MB streamed; "
              f"{rows['json_old']['s_per_M'] * 1.2:.0f} s, {empty + rows['json_old']['mb_per_M'] * 1.2:.0f} MB as one document (no target)")
        print(f"load average at the end: {_load()}")
        tasks_case(work, a.lines, a.tasks)
    finally:
        if a.keep is None:
            shutil.rmtree(work, ignore_errors=True)


def tasks_case(work: Path, lines: int, tasks: int) -> None:
    """The sharded case: per-task start-up reads and the one finalize (module doc), each in a fresh process."""
    empty, stage = run("empty", work)["peak_mb"], run("empty_stage", work)
    size = sum(p.stat().st_size for p in (work / "synth_tasks").glob("*.jsonl")) / 1e6
    print(f"\nsharded: {lines} lines ({size:.0f} MB) written by {tasks} tasks; load average {_load()} on {os.cpu_count()} cores; "
          f"a bare process {empty:.0f} MB, one with a stage's imports (torch, diffusers) {stage['peak_mb']:.0f} MB "
          f"(imports {stage['seconds']:.1f} s, not counted below)")
    print(f"{'per task':<44}{'ids':>9}{'s':>9}{'cpu s':>9}{'peak MB':>9}")
    for label, name, folder in ((f"start, task 0 of {tasks} (same N)", f"task_0_{tasks}", "synth_tasks"),
                                (f"start, task {tasks // 2} of {tasks} (same N)", f"task_{tasks // 2}_{tasks}", "synth_tasks"),
                                (f"start, task 0 of {tasks - 1} (N changed)", f"task_0_{tasks - 1}", "synth_tasks"),
                                ("start, old: every id of the folder", "resume_new", "synth_tasks")):
        r = run(name, work / folder)
        print(f"{label:<44}{r['n']:>9}{r['seconds']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_mb']:>9.0f}", flush=True)
    r = run("finalize", work / "synth")
    print(f"{'finalize (index, COCO JSON), once':<44}{r['samples']:>9}{r['seconds']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_mb']:>9.0f}")
    print(f"load average at the end: {_load()}")


if __name__ == "__main__":
    main()
