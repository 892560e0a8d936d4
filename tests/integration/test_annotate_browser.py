"""The labelling page in a real headless Chromium, end to end on the toy world.

Toy pipeline candidates -> media manifest -> `mmalign annotate serve` -> 10 image pairs labelled with the
keyboard (one undo, a reload mid-way) -> export -> `mmalign train` on the export; then 2 video pairs labelled
segment by segment with clicks (a reload mid-way) -> export -> DenseDPO's reader decodes them.

Needs Debian's chromium + chromium-driver (`apt-get install -y chromium chromium-driver`) and selenium
(`pip install -e ".[dev]"`); `.ci/run` installs them. Set MMALIGN_ANNOTATE_SCREENSHOTS=docs/annotate to
refresh the screenshots in docs/annotate.md.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest
from annotate_media import REPO, Server, write_video_pairs

ENABLE = (
    "needs Debian's chromium and chromium-driver plus selenium: apt-get install -y chromium chromium-driver "
    "&& pip install -e '.[dev]' (.ci/run does this)"
)


def _browser_paths() -> tuple[str, str] | None:
    binary = (
        os.environ.get("MMALIGN_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    )
    driver = os.environ.get("MMALIGN_CHROMEDRIVER") or shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def browser():
    paths = _browser_paths()
    if paths is None:
        pytest.skip(f"no chromium/chromedriver found: this test {ENABLE}")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip(f"selenium is not installed: this test {ENABLE}")
    pytest.importorskip("uvicorn", reason="pip install 'mmalign[annotate]'")
    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-dev-shm-usage",
        "--window-size=1280,800",
        "--autoplay-policy=no-user-gesture-required",
        "--disable-gpu",
        "--mute-audio",
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_page_load_timeout(60)
    yield driver
    driver.quit()


def wait(driver, predicate, what: str, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    status = driver.execute_script("return document.getElementById('status').textContent")
    raise AssertionError(f"timed out waiting for {what} (page status: {status!r})")


def state(driver) -> str:
    return driver.execute_script("return document.body.dataset.state")


def ready_item(driver, previous: str | None = None) -> dict:
    """Wait for a shown item with both media decoded (a different item than ``previous``); which medium
    (0 = a) is on the left."""

    def shown():
        info = driver.execute_script(
            "const l = document.getElementById('media-left'), r = document.getElementById('media-right');"
            "const loaded = (m) => m && (m.tagName === 'IMG' ? m.complete && m.naturalWidth > 0 : m.readyState >= 2);"
            "return document.body.dataset.state === 'ready' && loaded(l) && loaded(r) ? "
            "{id: document.body.dataset.item, left: l.getAttribute('src'), kind: document.body.dataset.kind} : null"
        )
        return info if info and info["id"] != previous else None

    info = wait(driver, shown, "an item")
    info["a_left"] = info["left"].endswith("/0")
    return info


def shot(driver, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("MMALIGN_ANNOTATE_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    driver.save_screenshot(str(folder / f"{name}.png"))


def login(driver, url: str, who: str) -> None:
    from selenium.webdriver.common.by import By

    driver.get(url)
    wait(driver, lambda: state(driver) == "login", "the annotator id form")
    box = driver.find_element(By.ID, "annotator-input")
    box.send_keys(who)
    return box


def key(driver, k: str) -> None:
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(driver).send_keys(k).perform()


def canonical(choice: str, a_left: bool) -> str:
    if choice in ("tie", "skip"):
        return choice
    return "a" if (choice == "left") == a_left else "b"


def toy_candidates(root: Path, prompts: int = 5, per_prompt: int = 4) -> Path:
    """Candidates from the toy pipeline, written as `mmalign generate` does (a media manifest)."""
    import torch
    from torchvision.utils import save_image

    from mmalign.toy.quickstart import all_toy_prompts
    from mmalign.toy.sample import DEFAULT_TOY_MODEL, generate, load_toy_pipeline

    torch.set_num_threads(1)
    root.mkdir(parents=True, exist_ok=True)
    texts = all_toy_prompts()[:prompts]
    prompt_list = [p for p in texts for _ in range(per_prompt)]
    seeds = list(range(len(prompt_list)))
    images = generate(load_toy_pipeline(), prompt_list, seeds, guidance_scale=1.0, steps=2)
    rows = []
    for i, (prompt, seed, image) in enumerate(zip(prompt_list, seeds, images)):
        save_image(image, root / f"{i:05d}.png")
        rows.append(
            {
                "path": f"{i:05d}.png",
                "prompt": prompt,
                "negative_prompt": "",
                "seed": seed,
                "guidance": 1.0,
                "steps": 2,
                "model": str(DEFAULT_TOY_MODEL),
                "lora": None,
                "kind": "image",
                "group": prompt,
            }
        )
    manifest = root / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest


def active(labels: Path) -> list[dict]:
    from mmalign.annotate.store import active_labels, read_labels

    return active_labels(read_labels(labels))


@pytest.mark.slow
def test_browser_images_keyboard_reload_export_train(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    from mmalign.cli import main
    from mmalign.data.pairs import load_pairs

    manifest = toy_candidates(tmp_path / "candidates")
    labels = tmp_path / "labels.jsonl"
    server = Server(manifest, labels, "--seed", "3")
    try:
        box = login(browser, server.url, "alice")
        shot(browser, "1-annotator-id", tmp_path)
        box.send_keys(Keys.ENTER)
        plan = [
            Keys.ARROW_LEFT,
            Keys.ARROW_RIGHT,
            "t",
            Keys.ARROW_LEFT,
            Keys.ARROW_RIGHT,
            Keys.ARROW_RIGHT,
            "s",
            Keys.ARROW_LEFT,
            Keys.ARROW_DOWN,
            Keys.ARROW_LEFT,
        ]
        names = {
            Keys.ARROW_LEFT: "left",
            Keys.ARROW_RIGHT: "right",
            "t": "tie",
            Keys.ARROW_DOWN: "tie",
            "s": "skip",
        }
        expected: dict[str, str] = {}
        previous = None
        for i, k in enumerate(plan):
            info = ready_item(browser, previous)
            if i == 0:
                shot(browser, "2-image-pair", tmp_path)
            if i == 2:  # a label, then undo: the same item comes back and is labelled again
                key(browser, Keys.ARROW_LEFT)
                ready_item(browser, info["id"])
                key(browser, "u")
                undone = info["id"]
                script = "return document.body.dataset.state === 'ready' && document.body.dataset.item"
                wait(browser, lambda: browser.execute_script(script) == undone, "the undone item")  # noqa: B023
            if i == 5:  # reload mid-way: the id is remembered and the same item is shown
                browser.refresh()
                again = ready_item(browser)
                assert again["id"] == info["id"] and again["a_left"] == info["a_left"]
            expected[info["id"]] = canonical(names[k], info["a_left"])
            key(browser, k)
            previous = info["id"]
        wait(browser, lambda: state(browser) == "done", "the done page")
        progress = browser.find_element("id", "progress").text
        assert (
            progress.startswith("10 labelled by you") and "9/10 items complete" in progress
        )  # a skip is no label
        shot(browser, "4-done", tmp_path)
    finally:
        server.stop()

    records = [json.loads(x) for x in labels.read_text().splitlines()]
    assert [r["type"] for r in records].count("undo") == 1 and len(records) == 12
    got = {r["item"]: r["choice"] for r in active(labels)}
    assert got == expected and len(got) == 10
    assert all(r["annotator"] == "alice" and r["elapsed_ms"] > 0 for r in active(labels))

    pairs = tmp_path / "export" / "pairs.jsonl"
    assert main(["annotate", "export", str(labels), "--out", str(pairs)]) == 0
    rows = [json.loads(x) for x in pairs.read_text().splitlines()]
    assert len(rows) == 9 and {r["user"] for r in rows} == {"alice"}  # the skip is dropped
    assert {r["item"]: {1.0: "a", 0.0: "b", 0.5: "tie"}[r["label_0"]] for r in rows} == {
        k: v for k, v in expected.items() if v != "skip"
    }
    records, counts = load_pairs(pairs)
    assert len(records) == sum(v in "ab" for v in expected.values())  # ties dropped by train's default

    run = tmp_path / "run"
    code = main(
        [
            "train",
            str(REPO / "configs/toy/quickstart.yaml"),
            f"data.source={pairs}",
            f"model.pretrained={REPO / 'mmalign/toy/assets/toy-sd'}",
            f"train.output_dir={run}",
            "train.max_steps=2",
            "train.batch_size=2",
            "train.warmup_steps=0",
            "train.progress=false",
            "data.cache=false",
        ]
    )
    assert code == 0
    history = [json.loads(x) for x in (run / "history.jsonl").read_text().splitlines() if x]
    assert len(history) == 2 and all(h["loss"] == h["loss"] for h in history)


@pytest.mark.slow
def test_browser_video_segments_by_clicks_with_reload(browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    from mmalign.cli import main
    from mmalign.data.segments import decode_video_pair, load_video_pairs

    manifest = write_video_pairs(tmp_path / "vids", n=2)
    labels = tmp_path / "labels.jsonl"
    server = Server(manifest, labels)
    plans = [(["left", "tie", "right"], "left"), (["right", "right", "tie"], "right")]
    expected = {}
    try:
        login(browser, server.url, "bob").send_keys(Keys.ENTER)
        previous = None
        for n, (segs, overall) in enumerate(plans):
            info = ready_item(browser, previous)
            assert info["kind"] == "video"
            cells = wait(browser, lambda: browser.find_elements(By.CSS_SELECTOR, ".seg"), "the segment strip")
            assert len(cells) == 3
            # one scrubber drives both clips
            wait(
                browser,
                lambda: browser.execute_script(
                    "return [...document.querySelectorAll('video')].every(v => v.readyState >= 1)"
                ),
                "video metadata",
            )
            browser.execute_script(
                "const s = document.getElementById('scrub'); s.value = 500;"
                "s.dispatchEvent(new Event('input'));"
            )
            times = wait(
                browser,
                lambda: (
                    (
                        t := browser.execute_script(
                            "return [...document.querySelectorAll('video')].map(v => v.currentTime)"
                        )
                    )
                    and t[0] > 1.0
                    and t
                ),
                "a seek",
            )
            assert abs(times[0] - times[1]) < 0.1 and abs(times[0] - 1.5) < 0.2
            if n == 0:  # the overall choice waits until every segment is marked
                key(browser, Keys.ARROW_LEFT)
                wait(
                    browser,
                    lambda: "mark every segment" in browser.find_element(By.ID, "status").text,
                    "the hint",
                )
            if n == 1:  # keys Z / X / C mark the segment under the playhead (1.5 s: the second) and move on
                key(browser, "z")
                marked = browser.find_elements(By.CSS_SELECTOR, ".seg button.on")
                assert [(b.get_attribute("data-seg"), b.get_attribute("data-val")) for b in marked] == [
                    ("1", "left")
                ]
            for i, value in enumerate(segs):  # the clicks decide (and replace the key's mark)
                browser.find_element(
                    By.CSS_SELECTOR, f'.seg button[data-seg="{i}"][data-val="{value}"]'
                ).click()
            if n == 0:
                shot(browser, "3-video-segments", tmp_path)
            a_sign = 1 if info["a_left"] else -1
            expected[info["id"]] = (
                [{"left": a_sign, "right": -a_sign, "tie": 0}[v] for v in segs],
                canonical(overall, info["a_left"]),
            )
            browser.find_element(By.CSS_SELECTOR, f'footer button[data-choice="{overall}"]').click()
            if n == 0:  # reload mid-way
                ready_item(browser, info["id"])
                browser.refresh()
            previous = info["id"]
        wait(browser, lambda: state(browser) == "done", "the done page")
    finally:
        server.stop()

    got = {r["item"]: (r["segment_labels"], r["choice"]) for r in active(labels)}
    assert got == expected and len(labels.read_text().splitlines()) == 2
    out = tmp_path / "video_pairs.jsonl"
    assert main(["annotate", "export", str(labels), "--out", str(out)]) == 0
    recs = load_video_pairs(out)
    assert [(r.labels, {1: "a", -1: "b", 0: "tie"}[r.clip_label]) for r in recs] == list(expected.values())
    for rec in recs:  # the labels fit the clips as DenseDPO decodes them
        item = decode_video_pair(
            rec,
            height=32,
            width=32,
            fps=None,
            num_frames=None,
            segment_seconds=1.0,
            compression=4,
            causal=True,
        )
        assert item["pixels_0"].shape[0] == 24 and item["labels"].numel() == 6
