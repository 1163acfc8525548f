"""The VAE round-trip command (common/diffusion/vae_roundtrip.py) on the real ADE20K samples in tests/data, with
the tiny VAE saved to a folder and loaded the way a user's checkpoint is."""

import json

import numpy as np
import pytest
import torch
from conftest import ADE_ROOT

from common.diffusion import vae_roundtrip as vr
from common.masks.colormap import color_to_label, palette_for
from common.data.datasets import read_dataset


@pytest.fixture(scope="module")
def vae_folder(tiny_models, tmp_path_factory):
    """The tiny SDXL pipeline's VAE saved on its own, as a user's fine-tuned VAE folder."""
    from diffusers import AutoencoderKL

    out = tmp_path_factory.mktemp("vae")
    AutoencoderKL.from_pretrained(tiny_models("sdxl"), subfolder="vae").save_pretrained(out)
    return out


def run(args):
    from typer.testing import CliRunner

    import typer

    app = typer.Typer(add_completion=False)
    app.command()(vr.main)
    return CliRunner().invoke(app, [str(a) for a in args])


def test_command_on_tiny_vae_matches_a_direct_round_trip(vae_folder, tmp_path):
    out = tmp_path / "rt.json"
    result = run(["--vae", vae_folder, "--data-root", ADE_ROOT, "--n", 2, "--resolution", 64, "--device", "cpu", "--json", out])
    assert result.exit_code == 0, result.output
    assert "generation" in result.output and "usual" in result.output and "3×3 vote" in result.output
    got = json.loads(out.read_text())
    assert got["samples"] == 2 and [s["id"] for s in got["per_sample"]] == ["ADE_val_00000001", "ADE_val_00000002"]

    # The same numbers, worked out here: the VAE called directly on the maps in [-1, 1], nearest colour back.
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_folder).eval()
    right = pixels = 0
    for sample in read_dataset("ade20k", ADE_ROOT, "val"):
        truth, maps = vr.colour_maps(sample, "ade20k", 64)
        assert min(truth.shape) == 64 and truth.shape[0] % 8 == 0 and truth.shape[1] % 8 == 0
        x = torch.from_numpy(maps["usual"].copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            y = vae.decode(vae.encode(x).latent_dist.mean).sample[0]
        cmap = ((y / 2 + 0.5).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
        right += int((color_to_label(cmap, palette_for("ade20k", "usual")) == truth).sum())
        pixels += truth.size
    assert got["pixels"] == pixels
    assert got["share"]["usual"]["nearest"] == pytest.approx(right / pixels)


def test_pipeline_folder_is_read_through_its_vae_subfolder(tiny_models, vae_folder, tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    for vae, out in ((tiny_models("sdxl"), a), (vae_folder, b)):
        assert run(["--vae", vae, "--data-root", ADE_ROOT, "--n", 1, "--resolution", 32, "--json", out]).exit_code == 0
    assert json.loads(a.read_text())["share"] == json.loads(b.read_text())["share"]


def test_perfect_and_stand_in_round_trips():
    """With a lossless round trip every pixel comes back; with the demo's JPEG + noise stand-in the
    generation palette keeps more than the usual one and the vote mends more (docs/colormaps.md's claim)."""
    from common.report.colormaps import degrade

    samples = read_dataset("ade20k", ADE_ROOT, "val")
    perfect = vr.study(samples, "ade20k", lambda maps: maps)
    for k in vr.KINDS:  # the vote itself costs a little on a clean map: it erodes one-pixel details
        assert perfect["share"][k]["nearest"] == 1.0 and 0.998 < perfect["share"][k]["vote"] <= 1.0
    rng = np.random.default_rng(0)
    noisy = vr.study(samples, "ade20k", lambda maps: [degrade(m, rng) for m in maps])
    s = noisy["share"]
    assert s["usual"]["nearest"] < s["generation"]["nearest"] < s["generation"]["vote"] < 1.0
    assert s["generation"]["vote"] > 0.99 and s["usual"]["nearest"] < 0.95


def test_bad_vae_folder_names_the_flag(tmp_path):
    result = run(["--vae", tmp_path, "--data-root", ADE_ROOT, "--n", 1])
    assert result.exit_code == 2
    assert "--vae" in result.output and "vae/config.json" in result.output


def test_toy_world_maps_are_semantic_not_panoptic(vae_folder, tmp_path):
    """--data toy reads 8-bit labels like ADE20K (it used to be taken for COCO panoptic PNGs)."""
    import subprocess
    import sys

    world = tmp_path / "world"
    subprocess.run([sys.executable, "-m", "common.toy.world", str(world), "--train", "2", "--val", "2", "--seed", "0"],
                   check=True, capture_output=True)
    out = tmp_path / "rt.json"
    result = run(["--vae", vae_folder, "--data", "toy", "--data-root", world, "--n", 2, "--resolution", 64, "--device", "cpu", "--json", out])
    assert result.exit_code == 0, result.output
    got = json.loads(out.read_text())
    assert got["samples"] == 2 and got["pixels"] == 2 * 64 * 64
    truth, maps = vr.colour_maps(read_dataset("toy", world, "val")[0], "toy")
    assert truth.shape == (64, 64) and set(np.unique(color_to_label(maps["generation"], palette_for("toy")))) == set(np.unique(truth))
