"""Model cards: README.md in a trained model folder, as diffusers' example trainers write them (issue 27 item 4).

    python -m common.report.card runs/text2mask-ade20k     # -> runs/text2mask-ade20k/README.md
    python -m common.report.card runs/mask2img-ade20k      # -> runs/mask2img-ade20k/README.md
    python -m common.report.card runs/seg-ade20k-aug       # -> runs/seg-ade20k-aug/model/README.md

A card opens with the Hub's YAML front matter (license, base_model, library_name, tags, built with
huggingface_hub's ModelCardData, as diffusers' `load_or_create_model_card` + `populate_model_card` do), then
says what the model is, how to load it, the data, the steps, every option of the run, its last validation
image and metrics, and the paper's citation. `write_model_card(folder, ...)` is what a trainer calls at its
final save; `card_for_run(RUN)` reads a finished run's seggen.json, options.json, stats.jsonl, metrics.json and
validation/ and calls it.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from common import SegGenError
from common.runtime.record import read_json

CITATION = """@article{ye2023seggen,
  title={SegGen: Supercharging Segmentation Models with Text2Mask and Mask2Img Synthesis},
  author={Ye, Hanrong and Kuen, Jason and Liu, Qing and Lin, Zhe and Price, Brian and Xu, Dan},
  journal={arXiv preprint arXiv:2311.03355},
  year={2023}
}"""
# The licenses of the published bases a fine-tune inherits (their model cards); any other base: "other", said in the card.
BASE_LICENSES = {"stabilityai/stable-diffusion-xl-base-1.0": "openrail++",
                 "stable-diffusion-v1-5/stable-diffusion-v1-5": "creativeml-openrail-m",
                 "runwayml/stable-diffusion-v1-5": "creativeml-openrail-m"}
SDXL_TAGS = ["stable-diffusion-xl", "stable-diffusion-xl-diffusers"]  # diffusers' SDXL example trainers' tags
STAGES = {
    "text2mask": {"library": "diffusers", "tags": ["text-to-image", "diffusers-training", "diffusers", "seggen", "text2mask"],
                  "what": "a Text2Mask model (SegGen §3.2): the base's UNet fine-tuned to paint segmentation colour maps "
                          "from captions, in the palette of `palette.json`",
                  "usage": ("from diffusers import DiffusionPipeline\n\npipe = DiffusionPipeline.from_pretrained(\"{folder}\")\n"
                            "colour_map = pipe(\"a living room with a sofa and a lamp\").images[0]\n"
                            "# masksyn.py --text2mask {folder} decodes colour maps to labels with palette.json")},
    "mask2img": {"library": "diffusers", "tags": ["text-to-image", "diffusers-training", "diffusers", "controlnet", "seggen", "mask2img"],
                 "what": "a Mask2Img ControlNet (SegGen §3.2) on a frozen base: it draws images from a caption and a "
                         "segmentation colour map in the palette of `palette.json`",
                 "usage": ("from diffusers import ControlNetModel, DiffusionPipeline\n\n"
                           "controlnet = ControlNetModel.from_pretrained(\"{folder}\")\n"
                           "pipe = DiffusionPipeline.from_pretrained(\"{base}\", controlnet=controlnet)\n"
                           "image = pipe(\"a street with cars\", image=colour_map).images[0]\n"
                           "# imgsyn.py / masksyn.py --mask2img {folder} do this at scale")},
    "seg": {"library": "transformers", "tags": ["image-segmentation", "mask2former", "seggen"],
            "what": "a segmentation model trained on real and SegGen synthetic data (SegGen §3.4, A.3)",
            "usage": ("from transformers import AutoImageProcessor, Mask2FormerForUniversalSegmentation\n\n"
                      "model = Mask2FormerForUniversalSegmentation.from_pretrained(\"{folder}\")\n"
                      "processor = AutoImageProcessor.from_pretrained(\"{folder}\")\n"
                      "# or: python predict.py --checkpoint {folder} --images DIR --out OUT")},
}


def write_model_card(folder: str | Path, *, stage: str, base: str | None, data: str, steps: int | None, options: dict,
                     validation_image: str | Path | None = None, metrics: dict | None = None, license: str | None = None,
                     sdxl: bool | None = None) -> Path:
    """Write FOLDER/README.md. stage: text2mask, mask2img or seg; base: the model fine-tuned (hub id or path);
    options: the run's options.json; validation_image: a picture inside FOLDER (linked) or outside it (copied in
    as validation.png); metrics: train_seg's metrics.json. license: default the base's, else "other"; sdxl: the
    base is SDXL (seggen.json's is_sdxl; default: "xl" in the base's name), for diffusers' SDXL tags."""
    from huggingface_hub import ModelCard, ModelCardData

    if stage not in STAGES:
        raise SegGenError(f"stage must be one of {', '.join(STAGES)} (got {stage!r})")
    folder, spec = Path(folder), STAGES[stage]
    if not folder.is_dir():
        raise SegGenError(f"model folder {folder} does not exist")
    license = license or BASE_LICENSES.get(str(base), "other")
    sdxl = ("xl" in str(base).lower()) if sdxl is None else sdxl
    tags = (SDXL_TAGS if stage != "seg" and sdxl else []) + spec["tags"]
    data_card = ModelCardData(license=license, library_name=spec["library"], base_model=base if _is_hub_id(base) else None,
                              tags=tags, pipeline_tag="image-segmentation" if stage == "seg" else "text-to-image",
                              inference=stage != "seg")
    body = card_body(folder, stage, base, data, steps, options, picture(folder, validation_image), metrics, license)
    card = ModelCard(f"---\n{data_card.to_yaml()}\n---\n{body}")
    card.save(folder / "README.md")
    return folder / "README.md"


def _is_hub_id(name) -> bool:
    from common.data.paths import is_hub_id

    return bool(name) and is_hub_id(str(name)) and not Path(str(name)).exists()


def picture(folder: Path, image: str | Path | None) -> str | None:
    """The validation image as a path relative to the card (copied into the folder when it lies outside)."""
    if image is None:
        return None
    image = Path(image)
    if not image.is_file():
        raise SegGenError(f"validation image {image} does not exist")
    try:
        return image.resolve().relative_to(folder.resolve()).as_posix()
    except ValueError:
        shutil.copy(image, folder / f"validation{image.suffix}")
        return f"validation{image.suffix}"


def card_body(folder: Path, stage: str, base, data: str, steps, options: dict, image: str | None, metrics: dict | None,
              license: str) -> str:
    spec = STAGES[stage]
    usage = spec["usage"].format(folder=folder.name, base=base)
    trained_on = ", ".join(f"{k} `{options[k]}`" for k in ("data_root", "split", "captions", "synthetic", "strategy") if options.get(k))
    parts = [f"# SegGen {stage} — {folder.name}", "",
             f"This is {spec['what']}.", "",
             f"Trained from **{base or 'its own initialisation'}** on **{data}** for "
             f"**{steps if steps is not None else 'an unknown number of'}** steps ({trained_on or 'see the options below'}).", ""]
    if license == "other":
        parts += ["The license above is a placeholder: set the terms of the base model and of the training data before sharing.", ""]
    if image:
        parts += ["## Validation", "", f"![validation]({image})", ""]
    if metrics:
        rows = [(k, v) for k, v in flat(metrics).items() if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if rows:
            parts += ["## Evaluation", "", "| metric | value |", "| --- | --- |", *[f"| {k} | {v:.4g} |" for k, v in rows], ""]
    parts += ["## How to use", "", "```python", usage, "```", "",
              "## Training", "", "Written by SegGen's trainer; every option of the run (options.json):", "",
              "<details><summary>options</summary>", "", "```json", json.dumps(options, indent=1, default=str), "```", "", "</details>", "",
              "## Citation", "", "```bibtex", CITATION, "```", ""]
    return "\n".join(parts)


def flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}/"))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------- from a finished run folder

def last_step(run: Path) -> int | None:
    """The step of stats.jsonl's last line (None when there is no such file)."""
    step = None
    path = run / "stats.jsonl"
    if path.is_file():
        for line in path.read_text().splitlines():
            try:
                step = json.loads(line).get("step", step)
            except ValueError:
                continue  # a line cut by a kill
    return step


def latest_validation(run: Path) -> Path | None:
    shots = sorted((run / "validation").glob("step-*.png"))
    return shots[-1] if shots else None


def card_for_run(run: str | Path) -> Path:
    """The card of a run folder: a generator (seggen.json: text2mask / mask2img) or a train_seg run (model/)."""
    run = Path(run)
    if (run / "seggen.json").is_file():
        rec = read_json(run / "seggen.json")
        options = read_json(run / "options.json") if (run / "options.json").is_file() else {}
        base = rec.get("base")
        from common.data.paths import resolve_recorded

        base = resolve_recorded(base, run) if base else None
        return write_model_card(run, stage=rec.get("stage", "text2mask"), base=base, data=rec.get("data", options.get("data", "?")),
                                steps=rec.get("steps", last_step(run)), options=options,
                                validation_image=latest_validation(run), sdxl=rec.get("is_sdxl"))
    if (run / "model").is_dir() and (run / "options.json").is_file():
        options = read_json(run / "options.json")
        metrics = read_json(run / "metrics.json") if (run / "metrics.json").is_file() else None
        steps = sum(p.get("steps", 0) for p in metrics.get("phases", [])) if metrics and metrics.get("phases") else last_step(run)
        return write_model_card(run / "model", stage="seg", base=options.get("model") or options.get("backbone"),
                                data=options.get("data", "?"), steps=steps, options=options,
                                validation_image=latest_validation(run), metrics=metrics)
    raise SegGenError(f"{run} is not a finished run: expected seggen.json (train_text2mask.py / train_mask2img.py) "
                      f"or model/ with options.json (train_seg.py)")


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m common.report.card", description="Write README.md model cards for trained runs.")
    p.add_argument("runs", nargs="+", type=Path, help="run folders of train_text2mask.py, train_mask2img.py or train_seg.py")
    a = p.parse_args(argv)
    try:
        for run in a.runs:
            print(card_for_run(run))
    except SegGenError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
