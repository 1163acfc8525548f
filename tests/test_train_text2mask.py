"""train_text2mask.py (paper §3.2, A.4) on the real ADE20K samples with the tiny SDXL (its 2-process run that
leaves a loadable pipeline: tests/test_resume.py): exact resume, learning, the colour maps the model sees,
and the errors users get for bad inputs."""

import json

import numpy as np
import pytest
import torch
from conftest import ADE_ROOT, COCO_ROOT, TRAIN_CAPTIONS, invoke, trainer_args, write_captions
from PIL import Image
from safetensors.torch import load_file

import train_text2mask
from common.masks.colormap import label_to_color, palette_for, panoptic_to_color, resize_nearest
from common.data.datasets import load_image, load_label, load_panoptic, read_dataset
from common.runtime.checkpoint import load as load_checkpoint
from common.diffusion.sdxl import drop_captions, encode_prompts, load_text_encoders, time_ids
from common.diffusion.training import ColorMapDataset, make_optimizer, noisy_latents

def run(args):
    return invoke(train_text2mask.app, args)


def unet_weights(folder):
    return load_file(str(next((folder / "unet").glob("*.safetensors"))))


# The 2-process accelerate run that leaves a pipeline: tests/test_resume.py (its uninterrupted 2-process run).


def test_resume_gives_the_weights_of_an_uninterrupted_run(tmp_path, tiny_models):
    base = tiny_models("sdxl")
    # EMA and caption dropout on: their state and random draws must survive the restart too.
    extra = {"--lr": 1e-3, "--ema": None, "--ema-decay": 0.9, "--caption-dropout": 0.5}
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    assert run(trainer_args(tmp_path, base, stopped, **{"--max-steps": 2, "--checkpointing-steps": 2}, **extra)).exit_code == 0
    halfway = unet_weights(stopped)
    with open(stopped / "stats.jsonl", "a") as f:  # as if killed after logging a step past its checkpoint
        f.write(json.dumps({"step": 3, "loss": 9.0}) + "\n")
    assert run(trainer_args(tmp_path, base, stopped, **{"--max-steps": 4, "--resume": "latest"}, **extra)).exit_code == 0
    assert run(trainer_args(tmp_path, base, whole, **{"--max-steps": 4}, **extra)).exit_code == 0
    resumed, uninterrupted = unet_weights(stopped), unet_weights(whole)
    moved = max((resumed[k] - halfway[k]).abs().max().item() for k in halfway)
    diff = max((resumed[k] - uninterrupted[k]).abs().max().item() for k in resumed)
    assert moved > 1e-4 and diff < 1e-6, (moved, diff)
    losses = lambda d: [s["loss"] for s in map(json.loads, (d / "stats.jsonl").read_text().splitlines()) if "loss" in s]  # noqa: E731
    assert losses(stopped) == pytest.approx(losses(whole), abs=1e-6)


def test_loss_falls_on_two_real_samples(tmp_path, tiny_models):
    out = tmp_path / "run"
    extra = {"--max-steps": 100, "--lr": 1e-3, "--checkpointing-steps": 40, "--checkpoints-total-limit": 1}
    assert run(trainer_args(tmp_path, tiny_models("sdxl"), out, **extra)).exit_code == 0
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-80"]  # the total limit removed checkpoint-40
    loss = [s["loss"] for s in map(json.loads, (out / "stats.jsonl").read_text().splitlines())]
    # Measured here: first 10 steps 0.81 on average, last 20 0.15 (ratio 0.19).
    assert len(loss) == 100 and np.mean(loss[-20:]) < 0.5 * np.mean(loss[:10]), (np.mean(loss[:10]), np.mean(loss[-20:]))


def test_gradient_accumulation_counts_optimizer_steps(tmp_path, tiny_models):
    """--global-batch-size 2 with a --batch-size cap of 1: two micro-steps per logged step, one AdamW step and
    one LR-schedule step per optimizer step (a linear schedule over 2 steps: lr/2, then 0), not per micro-step."""
    out = tmp_path / "run"
    extra = {"--max-steps": 2, "--global-batch-size": 2, "--batch-size": 1, "--lr-schedule": "linear",
             "--checkpointing-steps": 2}
    assert run(trainer_args(tmp_path, tiny_models("sdxl"), out, **extra)).exit_code == 0
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [s["step"] for s in stats] == [1, 2] and [s["lr"] for s in stats] == pytest.approx([5e-6, 0.0])
    options = json.loads((out / "options.json").read_text())
    assert (options["global_batch"], options["micro_batch"], options["gradient_accumulation"]) == (2, 1, 2)
    state = torch.load(out / "checkpoint-2" / "optimizer.bin", weights_only=False)["state"]
    assert {int(v["step"]) for v in state.values()} == {2}


def test_sd15_base_is_detected_from_its_folder(tmp_path, tiny_models):
    from diffusers import StableDiffusionPipeline

    out = tmp_path / "run"
    extra = {"--max-steps": 1, "--caption-dropout": 1.0, "--max-train-samples": 1}
    assert run(trainer_args(tmp_path, tiny_models("sd15"), out, **extra)).exit_code == 0
    options = json.loads((out / "options.json").read_text())
    assert options["is_sdxl"] is False and options["samples"] == 1
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe("a sofa", height=64, width=64, num_inference_steps=2, output_type="np").images.shape == (1, 64, 64, 3)


@pytest.mark.parametrize("data,root,split", [("ade20k", ADE_ROOT, "val"), ("coco", COCO_ROOT, "val")])
def test_colour_maps_hold_palette_colours_and_flip_with_the_image(data, root, split):
    samples, palette, r = read_dataset(data, root, split), palette_for(data), 64
    dataset = ColorMapDataset(samples, data, palette, r, flip_p=0.5)
    allowed = {tuple(c) for c in palette.colors.tolist()}
    for index, sample in enumerate(samples):
        image = load_image(sample.image)
        w0, h0 = image.size
        s = r / min(w0, h0)
        w, h = max(r, round(w0 * s)), max(r, round(h0 * s))
        full_image = np.asarray(image.resize((w, h), Image.BICUBIC))
        full_map = label_to_color(load_label(sample, data), palette) if data == "ade20k" else \
            panoptic_to_color(load_panoptic(sample), sample.segments, palette)
        full_map = resize_nearest(full_map, (w, h))
        flips = set()
        for seed in range(12):
            item = dataset[(index, seed)]
            cmap = item["colormap"].permute(1, 2, 0).numpy()
            img = ((item["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).round().astype(np.uint8)
            assert {tuple(c) for c in cmap.reshape(-1, 3).tolist()} <= allowed  # NEAREST everywhere: no new colours
            _, _, top, left, _, _ = item["time_ids"].int().tolist()  # the crop, in the (maybe flipped) frame
            assert item["time_ids"].tolist()[:2] == [h0, w0] and item["time_ids"].tolist()[4:] == [r, r]
            matches = []
            for flipped in (False, True):
                fi, fm = (full_image[:, ::-1], full_map[:, ::-1]) if flipped else (full_image, full_map)
                same_image = np.array_equal(img, fi[top:top + r, left:left + r])
                same_map = np.array_equal(cmap, fm[top:top + r, left:left + r])
                assert same_image == same_map  # image and colour map: one crop, one flip
                if same_image:
                    matches.append(flipped)
            assert len(matches) == 1
            flips.add(matches[0])
        assert flips == {False, True}  # random flip (appendix A.4) happens, both ways


def test_the_vae_encodes_palette_colours_only(tmp_path, tiny_models, monkeypatch):
    from diffusers import AutoencoderKL

    seen, encode = [], AutoencoderKL.encode

    def spy(self, x, *args, **kwargs):
        seen.append(x.detach().clone())
        return encode(self, x, *args, **kwargs)

    monkeypatch.setattr(AutoencoderKL, "encode", spy)
    assert run(trainer_args(tmp_path, tiny_models("sdxl"), tmp_path / "run", **{"--max-steps": 3})).exit_code == 0
    allowed = {tuple(c) for c in palette_for("ade20k").colors.tolist()}
    assert len(seen) == 3
    for x in seen:  # (B, 3, R, R) in [-1, 1]: the colour maps Text2Mask learns to draw
        assert x.shape == (2, 3, 64, 64)
        rgb = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).reshape(-1, 3)
        assert torch.allclose(rgb.float() / 127.5 - 1, x.permute(0, 2, 3, 1).reshape(-1, 3), atol=1e-6)  # exact colours
        assert {tuple(c) for c in rgb.tolist()} <= allowed


def test_caption_dropout_zeroes_sdxl_embeddings_and_uses_the_empty_prompt_otherwise():
    embeds, pooled = torch.randn(64, 77, 8), torch.randn(64, 4)
    empty = (torch.full((77, 8), 7.0), torch.full((4,), 7.0))
    g = torch.Generator().manual_seed(0)
    e, p = drop_captions(embeds, pooled, 0.5, g, empty, zeros=True)  # SDXL: force_zeros_for_empty_prompt
    dropped = (e == 0).all(-1).all(-1)
    assert 16 < dropped.sum() < 48 and torch.equal(dropped, (p == 0).all(-1))  # caption and pooled go together
    assert torch.equal(e[~dropped], embeds[~dropped]) and torch.equal(p[~dropped], pooled[~dropped])
    e, p = drop_captions(embeds, pooled, 1.0, g, empty, zeros=False)  # SD-1.5: the empty prompt's embedding
    assert (e == 7).all() and (p == 7).all()
    assert drop_captions(embeds, pooled, 0.0, g, empty, zeros=True)[0] is embeds


def test_8bit_adamw_from_bitsandbytes_steps():
    w = torch.nn.Parameter(torch.ones(64, 64))
    opt = make_optimizer([w], 1e-2, use_8bit=True)
    assert type(opt).__name__ == "AdamW8bit"
    w.grad = torch.ones_like(w)
    opt.step()
    assert torch.allclose(w.detach(), torch.full_like(w, 1 - 1e-2 - 1e-2 * 1e-2), atol=1e-3)  # Adam moves each weight by ~lr on its first step


def test_a_resumed_ema_comes_back_to_the_training_device(tmp_path):
    """accelerate loads registered objects (the EMAModel) with map_location="cpu": on a GPU run the EMA
    must be moved back, or the first ema.step after --resume fails on a device mismatch."""
    from diffusers.training_utils import EMAModel

    ema = EMAModel(torch.nn.Linear(3, 3).parameters())
    (tmp_path / "checkpoint-7").mkdir()
    torch.save(ema.state_dict(), tmp_path / "checkpoint-7" / "custom_checkpoint_0.pkl")

    class GpuRun:  # "meta" stands in for the GPU; load_state loads as accelerate's load_custom_state does
        device = torch.device("meta")

        def load_state(self, path):
            ema.load_state_dict(torch.load(f"{path}/custom_checkpoint_0.pkl", map_location="cpu", weights_only=False))

    load_checkpoint(GpuRun(), tmp_path / "checkpoint-7", ema)
    assert {p.device.type for p in ema.shadow_params} == {"meta"}


@pytest.mark.parametrize("kind", ["sdxl", "sd15"])
def test_prompt_embeddings_are_the_pipelines_own(tiny_models, kind):
    """The cached embeddings must be what the pipeline computes at sampling time: SDXL's penultimate hidden
    states of both encoders concatenated and the second encoder's pooled projection; SD-1.5's last ones."""
    from diffusers import DiffusionPipeline

    base, prompts = tiny_models(kind), ["a living room with a sofa", "a street"]
    pipe = DiffusionPipeline.from_pretrained(base)
    embeds, pooled = encode_prompts(prompts, load_text_encoders(str(base), kind == "sdxl", "cpu", torch.float32))
    expected = pipe.encode_prompt(prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.allclose(embeds, expected[0], atol=1e-6)
    if kind == "sdxl":
        assert embeds.shape[-1] == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
        assert torch.allclose(pooled, expected[2], atol=1e-6)
    else:
        assert pooled is None


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_noise_and_target_follow_the_schedulers_prediction_type(prediction_type):
    """x_t = sqrt(ᾱ_t)·x + sqrt(1-ᾱ_t)·ε at a uniform t; the target is ε, or v = sqrt(ᾱ_t)·ε - sqrt(1-ᾱ_t)·x
    when the base's scheduler says v_prediction (SD-2-style bases); anything else is refused."""
    from diffusers import DDPMScheduler

    from common import SegGenError

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=prediction_type)
    x = torch.randn(256, 4, 8, 8)
    if prediction_type == "sample":
        with pytest.raises(SegGenError, match="prediction_type 'sample' is not supported"):
            noisy_latents(x, scheduler, torch.Generator().manual_seed(0))
        return
    noisy, t, target = noisy_latents(x, scheduler, torch.Generator().manual_seed(0))
    ab = scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noise = (noisy - ab.sqrt() * x) / (1 - ab).sqrt()
    assert abs(noise.std().item() - 1) < 0.02  # what was added is unit Gaussian noise
    expected = noise if prediction_type == "epsilon" else ab.sqrt() * noise - (1 - ab).sqrt() * x
    assert torch.allclose(target, expected, atol=1e-4)
    assert 0 <= t.min() and t.max() < 1000 and t.float().std() > 200  # spread over all 1000 timesteps


def test_time_ids_follow_sdxl_order():
    assert time_ids((480, 640), (10, 20), (768, 768)).tolist() == [480, 640, 10, 20, 768, 768]


def test_cached_latents_train_like_encoding_every_step(tmp_path, tiny_models, monkeypatch):
    """--cache-latents stores the VAE's latent distribution (fp16) of both flips and samples from it with
    the step's generator: the losses are those of encoding every step, up to the fp16 storage."""
    from diffusers import AutoencoderKL

    base, losses, calls, encode = tiny_models("sdxl"), {}, [], AutoencoderKL.encode
    monkeypatch.setattr(AutoencoderKL, "encode", lambda self, x, *a, **k: calls.append(len(x)) or encode(self, x, *a, **k))
    for cached in (False, True):
        out, calls[:] = tmp_path / f"run-{cached}", []
        extra = {"--max-steps": 4, "--lr": 1e-3, "--center-crop": None, **({"--cache-latents": None} if cached else {})}
        assert run(trainer_args(tmp_path, base, out, **extra)).exit_code == 0
        losses[cached] = [s["loss"] for s in map(json.loads, (out / "stats.jsonl").read_text().splitlines())]
    assert calls == [4]  # cached: one encode of 2 samples × 2 flips, none per step
    rows = np.load(tmp_path / "run-True" / "cache" / "latents.npy", mmap_mode="r")
    assert rows.shape == (2 * 2, 8, 8, 8)  # (mean, log-variance) × 4 channels, 64/8
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


@pytest.mark.parametrize("case,message", [
    ("resolution", "--resolution 100 is not a multiple of 8"),
    ("captions", "caption ids are not in the dataset (e.g. 'ADE_train_00000001')"),
    ("pretrained", "--pretrained {tmp}/nowhere: no such folder"),
    ("vae", "--vae {tmp}/novae: no such folder"),
    ("resume", "--resume latest: no complete checkpoint-* folder in {tmp}/run"),
    ("trained", "--output-dir {tmp}/run holds a trained model"),
    ("cache-latents", "--cache-latents needs --center-crop"),
    ("leftover", "holds checkpoints of an earlier run: pass --resume latest"),
    ("lr", "Invalid value for '--lr': must be a finite number (got inf)"),
])
def test_bad_inputs_get_one_clear_error(tmp_path, tiny_models, case, message):
    base, out = tiny_models("sdxl"), tmp_path / "run"
    args = trainer_args(tmp_path, base, out, **{"--max-steps": 1})
    if case == "resolution":
        args += ["--resolution", "100"]
    elif case == "captions":  # the train split's captions given with --split val
        write_captions(tmp_path / "other.jsonl", {"ADE_train_00000001": "a bedroom"})
        args += ["--captions", str(tmp_path / "other.jsonl")]
    elif case == "pretrained":
        args += ["--pretrained", str(tmp_path / "nowhere")]
    elif case == "vae":
        args += ["--vae", str(tmp_path / "novae")]
    elif case == "resume":
        args += ["--resume", "latest"]
    elif case == "trained":  # a finished run that kept no checkpoint
        out.mkdir()
        (out / "model_index.json").write_text("{}")
    elif case == "cache-latents":
        args += ["--cache-latents"]
    elif case == "leftover":
        (out / "checkpoint-5").mkdir(parents=True)
    elif case == "lr":  # inf trained NaNs from the second step
        args += ["--lr", "inf"]
    result = run(args)
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in " ".join(result.output.split())
    assert (out / "model_index.json").read_text() == "{}" if case == "trained" else not (out / "model_index.json").exists()  # nothing written


def test_a_run_killed_before_its_first_checkpoint_starts_over(tmp_path, tiny_models):
    out = tmp_path / "run"
    out.mkdir()
    (out / "options.json").write_text("{}")
    (out / "stats.jsonl").write_text(json.dumps({"step": 1, "loss": 9.0}) + "\n")  # what the killed run logged
    assert run(trainer_args(tmp_path, tiny_models("sdxl"), out, **{"--max-steps": 1})).exit_code == 0
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert len(stats) == 1 and stats[0]["loss"] != 9.0


def test_nan_loss_stops_with_the_step_and_last_checkpoint(tmp_path, tiny_models):
    out = tmp_path / "run"
    result = run(trainer_args(tmp_path, tiny_models("sdxl"), out, **{"--max-steps": 6, "--lr": 1e30, "--max-grad-norm": 0,
                                                                    "--checkpointing-steps": 1}))
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "the training loss became nan at step 2" in text and f"last good checkpoint is {out}/checkpoint-1" in text


# ---------------------------------------------------------------- validation: held-out captions, in the trackers

def validation_in_tensorboard(logs):
    """The validation grids (H, W, 3 as PNG sizes) and caption texts a run's TensorBoard event files hold."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(logs), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    grids = [(e.step, e.height, e.width) for e in events.Images("validation")]
    texts = [t.tensor_proto.string_val[0].decode() for t in events.Tensors("validation/captions/text_summary")]
    return grids, texts


def train_on_the_train_split(tmp_path, out, **extra):
    """A one-step run on ADE20K's training sample, validated at step 1 with one sampler step."""
    captions = tmp_path / "train_captions.jsonl"
    captions.write_text(json.dumps({"id": "ADE_train_00000001", "image": "ADEChallengeData2016/images/training/ADE_train_00000001.jpg",
                                    "caption": "a bedroom with a bed"}) + "\n")
    return {"--split": "train", "--captions": captions, "--max-steps": 1, "--validation-steps": 1,
            "--validation-inference-steps": 1, **extra}


def test_validation_grids_of_held_out_captions_reach_tensorboard(tmp_path, tiny_models, monkeypatch):
    monkeypatch.chdir(tmp_path)  # captions/ade20k_val.jsonl: the default validation captions, found like the training ones
    (tmp_path / "captions").mkdir()
    write_captions(tmp_path / "captions" / "ade20k_val.jsonl")  # the two ADE20K validation samples
    out = tmp_path / "run"
    result = run(trainer_args(tmp_path, tiny_models("sdxl"), out, **train_on_the_train_split(tmp_path, out, **{"--report-to": "tensorboard"})))
    assert result.exit_code == 0, result.output
    grids, texts = validation_in_tensorboard(out / "logs" / "text2mask")
    # One grid at step 1: per held-out caption a row of sample, its projection and the real colour map (labels known).
    assert grids == [(1, 2 * 64, 3 * 64)]
    assert len(texts) == 1 and all(c in texts[0] for c in TRAIN_CAPTIONS.values()) and "bedroom" not in texts[0]
    stats = [json.loads(line) for line in (out / "stats.jsonl").read_text().splitlines()]
    assert [s["validation"]["captions"] for s in stats if "validation" in s] == ["captions/ade20k_val.jsonl"]
    assert (out / "validation" / "step-000001.png").is_file()


def test_validation_captions_may_be_captions_only_and_training_samples_are_a_said_fallback(tmp_path, tiny_models, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no captions/ade20k_val.jsonl here
    mine = tmp_path / "held_out.jsonl"
    mine.write_text(json.dumps({"id": "p1", "caption": "a kitchen with a table"}) + "\n")
    base, given, fallback = tiny_models("sdxl"), tmp_path / "given", tmp_path / "fallback"
    result = run(trainer_args(tmp_path, base, given, **train_on_the_train_split(tmp_path, given, **{"--validation-captions": mine})))
    assert result.exit_code == 0, result.output
    assert "training samples" not in result.output
    grid = Image.open(given / "validation" / "step-000001.png")
    assert grid.size == (2 * 64, 64)  # no label for p1: sample and projection only
    result = run(trainer_args(tmp_path, base, fallback, **train_on_the_train_split(tmp_path, fallback)))
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    assert text.count("validation uses the first 1 training samples (captions/ade20k_val.jsonl does not exist)") == 1, text
    assert Image.open(fallback / "validation" / "step-000001.png").size == (3 * 64, 64)


def test_report_to_wandb_without_wandb_is_refused_at_start(tmp_path, tiny_models):
    import importlib.util

    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed here")
    out = tmp_path / "run"
    result = run(trainer_args(tmp_path, tiny_models("sdxl"), out, **{"--max-steps": 1, "--report-to": "wandb"}))
    assert result.exit_code == 2, result.output
    assert "--report-to wandb needs the wandb package: pip install wandb" in " ".join(result.output.split())
    assert not (out / "cache").exists()  # refused before any caption was encoded


def test_validation_grids_go_to_wandb_as_images_with_their_captions(monkeypatch):
    """common/runtime/tracking.py log_images with a stand-in for the optional wandb package (not installed here)."""
    import sys
    from types import SimpleNamespace

    from common.runtime.tracking import log_images

    logged = []
    fake = SimpleNamespace(Image=lambda image, caption: ("wandb.Image", image.size, caption))
    monkeypatch.setitem(sys.modules, "wandb", fake)
    run_ = SimpleNamespace(log=lambda values, step: logged.append((step, values)))
    accelerator = SimpleNamespace(is_main_process=True, trackers=[SimpleNamespace(name="wandb", run=run_)])
    log_images(accelerator, 7, {"validation": Image.new("RGB", (192, 128))}, ["a street", "a room"])
    assert logged == [(7, {"validation": ("wandb.Image", (192, 128), "1. a street\n2. a room")})]
