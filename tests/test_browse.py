"""browse.py: the static site of a synthetic folder, checked in a real headless browser (Debian's chromium).

The folder is made from the real ADE20K samples of tests/data in masksyn's layout (manifest, colour maps
in the generation palette, quality.jsonl figures, rejected.jsonl lines with and without a picture). Pages
are opened with given URL states and the rendered DOM is read back (chromium --dump-dom)."""

import base64
import json
import re
import select
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from common import SegGenError
from common.data.datasets import read_dataset
from common.data.manifest import ManifestWriter
from common.masks.colormap import class_names, label_to_color, palette_for
from common.report import browse
from common.synthesis.synth import derive_seed
from tests.conftest import ADE_ROOT, ROOT, invoke

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SETTINGS = {"data": "ade20k", "seed": 7, "palette": "ade20k-generation"}
# miou of each sample (by source, k): the sort order the page must show
MIOU = {("ADE_train_00000001", 0): 0.50, ("ADE_train_00000001", 1): 0.10, ("ADE_val_00000001", 0): 0.90,
        ("ADE_val_00000001", 1): 0.30, ("ADE_val_00000002", 0): 0.70, ("ADE_val_00000002", 1): None}


def masksyn_folder(folder: Path, captions: dict | None = None) -> Path:
    """Six samples from the three real ADE20K samples (two each), their quality lines, three rejected masks.
    Captions: by source id, else markup that the page must show as text."""
    palette = palette_for("ade20k", "generation")
    for d in ("images", "annotations", "colormaps", "rejected"):
        (folder / d).mkdir(parents=True)
    real = read_dataset("ade20k", ADE_ROOT, "train") + read_dataset("ade20k", ADE_ROOT, "val")
    with ManifestWriter(folder / "manifest.jsonl") as w, ManifestWriter(folder / "quality.jsonl") as q:
        for s in real:
            label = np.asarray(Image.open(s.annotation).resize((96, 72), Image.NEAREST))
            for k in range(2):
                sid = f"{s.id}_{k:03d}"
                Image.open(s.image).convert("RGB").resize((96, 72)).save(folder / f"images/{sid}.jpg")
                Image.fromarray(label).save(folder / f"annotations/{sid}.png")
                Image.fromarray(label_to_color(label, palette)).save(folder / f"colormaps/{sid}.png")
                w.append({"id": sid, "source_id": s.id, "k": k, "method": "masksyn", "image": f"images/{sid}.jpg",
                          "annotation": f"annotations/{sid}.png", "colormap": f"colormaps/{sid}.png",
                          "caption": (captions or {}).get(s.id, f"a scene <b>{s.id}</b>"), "seed": 1000 + k, "settings": SETTINGS, "models": {},
                          "off_palette": 0.01 * (k + 1), "classes": len(np.unique(label))})
                miou = MIOU[(s.id, k)]
                if miou is not None:  # one sample not judged yet: it sorts last
                    classes = [int(v) - 1 for v in np.unique(label) if v > 0]
                    q.append({"id": sid, "miou": miou, "accuracy": miou + 0.05, "loss_mean": 1 - miou, "pixels": int(label.size),
                              "loss": {str(t): [0.5, 10] for t in classes}, "iou": {str(t): [5, 10] for t in classes},
                              "off_palette": 0.01 * (k + 1)})
    Image.new("RGB", (64, 48), (200, 10, 10)).save(folder / "rejected/ADE_val_00000001_002.png")
    with ManifestWriter(folder / "rejected.jsonl") as r:
        r.append({"id": "ADE_val_00000001_002", "source_id": "ADE_val_00000001", "k": 2, "rule": "classes",
                  "reason": "1 class(es), fewer than 2", "off_palette": 0.0, "classes": 1, "settings": SETTINGS,
                  "colormap": "rejected/ADE_val_00000001_002.png"})
        r.append({"id": "ADE_val_00000002_002", "source_id": "ADE_val_00000002", "k": 2, "rule": "off_palette",
                  "reason": "off-palette 0.4 > 0.2", "off_palette": 0.4, "classes": 5, "settings": SETTINGS})
        r.append({"id": "ADE_val_00000002_003", "source_id": "ADE_val_00000002", "k": 3, "rule": "classes",
                  "reason": "0 class(es), fewer than 2", "off_palette": 0.0, "classes": 0, "settings": SETTINGS})
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("browse")
    folder = masksyn_folder(tmp / "masksyn-ade20k")
    summary = browse.build([folder], tmp / "site", data_root=ADE_ROOT, chunk=2, record_chunk=3, page=4)  # real images of both splits
    return {"tmp": tmp, "folder": folder, "out": tmp / "site", "summary": summary}


def label_classes(folder: Path, sid: str) -> set[str]:
    names = class_names("ade20k")
    return {names[int(v)] for v in np.unique(np.asarray(Image.open(folder / f"annotations/{sid}.png"))) if v > 0}


class Chromium:
    """One headless chromium for the module, driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
    JSON messages ended by NUL on fds 3 and 4), so each page costs a navigation, not a browser start (~2 s)."""

    def __init__(self):
        import os

        to_child, self._w = os.pipe()
        self._r, from_child = os.pipe()

        def fds():  # the child reads commands on fd 3 and writes replies on fd 4 (dup first: a pipe may be fd 3 already)
            a, b = os.dup(to_child), os.dup(from_child)
            os.dup2(a, 3), os.dup2(b, 4)

        self.proc = subprocess.Popen([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                                      "--remote-debugging-pipe", "--window-size=1400,1000", "about:blank"],
                                     preexec_fn=fds, close_fds=False, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child), os.close(from_child)
        self.n, self.buffer, self.session = 0, b"", None
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Emulation.setDeviceMetricsOverride", width=1400, height=1000, deviceScaleFactor=1, mobile=False)

    def call(self, method: str, **params) -> dict:
        import os

        self.n += 1
        message = {"id": self.n, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        os.write(self._w, json.dumps(message).encode() + b"\0")
        while True:
            while b"\0" not in self.buffer:
                ready, _, _ = select.select([self._r], [], [], 60)
                assert ready, f"chromium did not answer {method} in 60 s"
                data = os.read(self._r, 1 << 16)
                assert data, "chromium closed its DevTools pipe"
                self.buffer += data
            raw, self.buffer = self.buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self.n:
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def evaluate(self, expression: str):
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def open(self, url: str, timeout: float = 30) -> str:
        """The DOM of `url` once the page says it is ready (or failed), and the images on screen are in."""
        import time

        self.call("Page.navigate", url="about:blank")  # a new document each time: a hash-only change would keep the old one
        self.call("Page.navigate", url=url)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.evaluate("document.body && ['ready', 'error'].includes(document.body.dataset.state) && "
                             "Array.from(document.images).every(i => i.complete || i.getBoundingClientRect().top > innerHeight)"):
                return self.evaluate("document.documentElement.outerHTML")
            time.sleep(0.05)
        raise AssertionError(f"{url} did not render in {timeout} s")

    def screenshot(self, path: Path) -> Path:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))
        return path

    def close(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no chromium on PATH: `apt-get install -y chromium` (make test installs it where it can)")
    b = Chromium()
    yield b
    b.close()


def open_page(browser, out: Path, fragment: str, screenshot: Path | None = None, state: str = "ready") -> str:
    """The DOM of index.html#fragment after its scripts ran; a screenshot of it if asked."""
    dom = browser.open((out / "index.html").resolve().as_uri() + "#" + fragment)
    assert f'data-state="{state}"' in dom, re.search(r'<p id="message">(.*?)</p>', dom, re.S)
    if screenshot is not None:
        browser.screenshot(screenshot)
    return dom


def card_ids(dom: str) -> list[str]:
    return re.findall(r'<article class="card[^"]*" data-id="([^"]+)"', dom)


def count(dom: str) -> int:
    return int(re.search(r'id="count" data-count="(\d+)"', dom).group(1))


def test_site_files_are_chunked_scripts(site):
    out, s = site["out"], site["summary"]
    assert s["samples"] == 6 and s["rejected"] == 3 and "miou" in s["figures"] and s["real"]
    meta = (out / "data/meta.js").read_text()
    assert meta.startswith('SEGGEN.put("meta",')
    assert sorted(p.name for p in (out / "data/s").glob("r*.js")) == ["r0.js", "r1.js"]  # 6 samples, 3 a file
    assert (out / "index.html").is_file() and (out / "browse.js").is_file()


def test_sorting_by_a_figure_orders_the_cards_and_keeps_unjudged_last(site, browser):
    judged = sorted((m, f"{s}_{k:03d}") for (s, k), m in MIOU.items() if m is not None)
    dom = open_page(browser, site["out"], "sort=miou&size=10")
    assert card_ids(dom) == [sid for _, sid in judged] + ["ADE_val_00000002_001"]
    dom = open_page(browser, site["out"], "sort=-miou&size=10")
    assert card_ids(dom) == [sid for _, sid in reversed(judged)] + ["ADE_val_00000002_001"]
    dom = open_page(browser, site["out"], "sort=-miou&size=2&page=2")  # a page of a sorted, chunked view
    assert card_ids(dom) == [judged[-3][1], judged[-4][1]]
    assert count(dom) == 6


def test_filter_by_class_counts_only_samples_with_it(site, browser):
    folder = site["folder"]
    ids = sorted(p.stem for p in (folder / "images").iterdir())
    name = sorted(label_classes(folder, "ADE_val_00000002_000") - label_classes(folder, "ADE_train_00000001_000"))[0]
    expect = [i for i in ids if name in label_classes(folder, i)]
    miou = {f"{s}_{k:03d}": m for (s, k), m in MIOU.items()}
    expect = sorted(expect, key=lambda i: (miou[i] is None, -(miou[i] or 0)))  # descending, unjudged last
    dom = open_page(browser, site["out"], f"class={name}&sort=-miou&size=10")
    assert count(dom) == len(expect) and card_ids(dom) == expect
    dom = open_page(browser, site["out"], f"class={name}&sort=-miou&size=1&page=2")  # one card a page: the second
    assert card_ids(dom) == expect[1:2]
    assert f'data-class="{name}"' in dom  # the legend names the class


def test_filter_by_source_shows_the_real_image_beside(site, browser):
    dom = open_page(browser, site["out"], "source=ADE_val_00000001&sort=miou")
    assert card_ids(dom) == ["ADE_val_00000001_001", "ADE_val_00000001_000"] and count(dom) == 2
    assert "ADE_val_00000001.jpg" in dom  # the real image, by a relative path
    assert "&lt;b&gt;ADE_val_00000001&lt;/b&gt;" in dom  # a caption is text, never markup
    dom = open_page(browser, site["out"], "source=ADE_train_00000001")
    assert count(dom) == 2 and "images/training/ADE_train_00000001.jpg" in dom


def test_rejected_masks_by_rule_with_their_picture_when_kept(site, browser, tmp_path):
    dom = open_page(browser, site["out"], "rule=classes", screenshot=tmp_path / "rejected.png")
    assert card_ids(dom) == ["ADE_val_00000001_002", "ADE_val_00000002_003"] and count(dom) == 2
    assert "rejected/ADE_val_00000001_002.png" in dom and "no picture kept" in dom
    assert "fewer than 2" in dom
    seed = derive_seed(SETTINGS["seed"], "ADE_val_00000001", 2)  # not recorded on the line: derived, every digit kept
    assert f"<dd>{seed}</dd>" in dom
    dom = open_page(browser, site["out"], "rule=all&sort=-off_palette")
    assert card_ids(dom)[0] == "ADE_val_00000002_002" and count(dom) == 3
    assert (tmp_path / "rejected.png").stat().st_size > 1000


def test_screenshot_of_the_grid(site, browser, tmp_path):
    shot = tmp_path / "grid.png"
    dom = open_page(browser, site["out"], "sort=-miou", screenshot=shot)
    assert count(dom) == 6 and Image.open(shot).size == (1400, 1000)


def test_unknown_sort_is_said_on_the_page(site, browser):
    dom = open_page(browser, site["out"], "sort=nosuch", state="error")
    assert "no figure" in dom and card_ids(dom) == []


def test_two_folders_in_one_site(site, browser, tmp_path):
    other = tmp_path / "imgsyn-ade20k"
    shutil.copytree(site["folder"], other)
    browse.build([site["folder"], other], tmp_path / "both", data_root=ADE_ROOT)
    dom = open_page(browser, tmp_path / "both", "sort=-miou&size=20")
    assert count(dom) == 12 and dom.count("<dd>imgsyn-ade20k</dd>") == 6 and dom.count("<dd>masksyn-ade20k</dd>") == 6
    dom = open_page(browser, tmp_path / "both", "rule=all")
    assert count(dom) == 6


def test_bad_inputs_are_named(site, tmp_path):
    with pytest.raises(SegGenError, match="not a synthetic folder"):
        browse.build([tmp_path], tmp_path / "out")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine/notes.txt").write_text("x")
    with pytest.raises(SegGenError, match="--out .* not a site"):
        browse.build([site["folder"]], tmp_path / "mine")


def test_command_line_writes_the_site(site, tmp_path):
    import browse as script

    r = invoke(typer_app(script.main), [str(site["folder"]), "--out", str(tmp_path / "b"), "--data-root", str(ADE_ROOT), "--split", "val"])
    assert r.exit_code == 0, r.output
    assert "6 samples, 3 rejected masks" in r.output and (tmp_path / "b/index.html").is_file()
    r = subprocess.run([sys.executable, str(ROOT / "browse.py"), str(tmp_path / "nothing"), "--out", str(tmp_path / "c")],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and "not a synthetic folder" in r.stderr and "Traceback" not in r.stderr


def typer_app(main):
    import typer

    app = typer.Typer()
    app.command()(main)
    return app
