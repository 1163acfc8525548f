"""The code the stage scripts share, one package per subject. Imports run one way: the stage scripts at the
top import these packages; each package imports only the ones listed before it (tests/test_layout.py holds
this, and fails on a circle between modules or on `common` importing a script).

    runtime     the process plumbing: command line, locks, progress, quiet libraries, threads, shards,
                checkpoints, per-step seeds, safetensors-only weights, DataLoader hand-over
    masks       colour maps: the paper's f_mask→color and f_color→mask (§3.2, A.2), palettes, class tables
    data        datasets and manifests: real readers (ADE20K, COCO, toy), synthetic folders, indexes,
                default paths between stages, real subsets (Table 4)
    diffusion   the generators' shared code: SDXL conditioning, the EDM sampler (A.4), training (A.4),
                the VAE round trip of colour maps (A.7)
    synthesis   MaskSyn and ImgSyn (§3.3): jobs and seeds, loading the generators, sampling, writing folders
    seg         segmentation (§3.4, §4, A.3): label tables, data recipes, Mask2Former and HRNet, the loop,
                evaluation (mIoU, PQ, AP), and the quality filter of synthetic data (quality.py)
    models      models without trained weights: tiny random ones (tests, smoke) and real-size ones (bench)
    toy         the toy world (a procedural dataset) and its SDXL-architecture base
    report      what a run shows a person: reproduce.sh's report, the toy report, the colour-map demo sheet

`assets/` holds shipped files: class tables, published model configs, the toy base's weights.
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"

# The order of the packages: each may import `common` itself and the packages before it, never one after it.
LAYERS = ("runtime", "masks", "data", "diffusion", "synthesis", "seg", "models", "toy", "report")


class SegGenError(Exception):
    """A bad input the user can fix. The message names the flag or file and the fix; scripts
    print it without a traceback and exit with status 2."""
