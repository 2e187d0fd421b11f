"""The run explorer (issue #29): the compact recall record, the page of a run and of several runs side by side,
checked in a real headless browser (Chromium and chromedriver from Debian's packages, `make browser`).

One tiny known run per method is made once for the module (nano model, one synthetic stream of 40 s, a needle
planted early, 3 questions): `full` recalls the needle, `sliding_window` at a 2-frame budget does not, `mukv`
reports its recall per granularity."""

from __future__ import annotations

import base64
import io
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import compose_cfg

from mukv.report.explorer import EXPLORER, load_run, main, read_page_data, write_explorer
from mukv.report.recall import RecallMap, pack_recalled

RUNS = {"full": [], "sliding_window": ["budget_frames=2"], "mukv": ["budget_frames=4"]}
DATASET = ["experiment=smoke", "dataset.synthetic.duration_s=40", "dataset.synthetic.questions_per_video=3",
           "dataset.synthetic.question_types=[detail,current,motion]", "dataset.synthetic.needle_depth=0.1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    from mukv.config import register_configs
    from mukv.train_eval import train_eval

    register_configs()
    root = tmp_path_factory.mktemp("explorer")
    out = {}
    for method, extra in RUNS.items():
        cfg = compose_cfg(*DATASET, f"cache={method}", *extra)
        folder = root / method
        cfg.paths.output_dir = str(folder)
        train_eval(cfg, folder)
        out[method] = folder
    return out


@pytest.fixture(scope="module")
def compare_page(runs, tmp_path_factory) -> Path:
    return write_explorer([runs["full"], runs["sliding_window"], runs["mukv"]],
                          tmp_path_factory.mktemp("page") / "compare.html")


def page_data(path: Path) -> dict:
    return read_page_data(path)


def detail_row(folder: Path) -> dict:
    (row,) = [r for r in map(json.loads, (folder / "predictions.jsonl").read_text().splitlines())
              if r["qtype"] == "detail"]
    return row


# ------------------------------------------------------------------------------------------ the record
def test_recall_record_round_trips_windows_tokens_frames_and_groups():
    class Rec:  # the fields of mukv.cache.base.Recalled
        def __init__(self, tokens=None, frames=None, groups=None):
            self.tokens, self.frames, self.groups = tokens, frames, groups

    t = 16
    window = pack_recalled(Rec(tokens=range(3 * t + 5, 9 * t + 2)), t)  # a window cuts its end frames
    rm = RecallMap.unpack(window)
    assert window["frames"] == [[4, 9]] and set(window["partial"]) == {"3", "9"}
    for tok in range(0, 12 * t):
        assert rm.coverage(tok // t)[tok % t] == (3 * t + 5 <= tok < 9 * t + 2)
    scattered = [5, 17, 18, 40] + list(range(5 * t, 6 * t))
    rm = RecallMap.unpack(pack_recalled(Rec(tokens=scattered, groups={"g0.25": [5, 17], "g1.0": range(80, 96)}), t))
    assert rm.frames() == [0, 1, 2, 5] and rm.fraction(5) == 1.0 and rm.fraction(1) == 2 / t
    assert rm.cell_grid(0).shape == (4, 4) and rm.cell_grid(0)[1, 1] == 1 and rm.cell_grid(0).sum() == 1
    assert rm.groups["g0.25"].frames() == [0, 1] and rm.groups["g1.0"].frames() == [5]
    whole = RecallMap.unpack(pack_recalled(Rec(frames=[7, 2, 3]), 196))
    assert whole.frames() == [2, 3, 7] and whole.grid == (14, 14) and whole.fraction(3) == 1.0
    stepped = RecallMap.unpack(pack_recalled(Rec(frames=[1]), 12, frames_per_step=2, grid=(3, 4)))
    assert stepped.frames() == [2, 3] and stepped.grid == (3, 4) and stepped.fraction(0) == 0.0
    assert pack_recalled(Rec(), t) is None and RecallMap.unpack(None) is None


def test_recall_stays_in_the_journal_and_out_of_the_csv(tmp_path):
    from mukv.report.outputs import RowJournal, read_csv_records, read_journal

    journal = RowJournal(tmp_path / "predictions.csv", ident="qid", journal_only=("recalled",))
    for i in range(3):
        journal.append({"qid": f"q{i}", "prediction": "red", "recalled": {"frames": [[0, i + 1]]}})
    header, rows = read_csv_records(tmp_path / "predictions.csv")
    assert header == ["qid", "prediction"] and [r["qid"] for r in rows] == ["q0", "q1", "q2"]
    assert [r["recalled"] for r in read_journal(tmp_path / "predictions.jsonl")[0]] == [
        {"frames": [[0, i + 1]]} for i in range(3)]
    again = RowJournal(tmp_path / "predictions.csv", ident="qid", journal_only=("recalled",))
    assert not again.sync()  # the CSV is whole without the journal-only column: nothing to render


# ------------------------------------------------------------------------------------------ the run folder
def test_every_run_writes_its_page_and_journals_what_each_answer_recalled(runs):
    for method, folder in runs.items():
        assert (folder / EXPLORER).stat().st_size > 1_000_000, method  # plotly.js is inside: it opens offline
        header = pd.read_csv(folder / "predictions.csv", nrows=0).columns
        assert "recalled" not in header and "device_kv_bytes" in header  # the record stays in the journal
    full, window, mukv = (detail_row(runs[m]) for m in RUNS)
    needle = json.loads(full["meta"])["needle_frame"]
    assert full["evidence_recalled"] == 1.0 and window["evidence_recalled"] == 0.0  # the run the page must show
    assert RecallMap.unpack(full["recalled"]).frames() == list(range(full["frames_seen"]))
    got = RecallMap.unpack(window["recalled"]).frames()
    assert needle not in got and got == list(range(window["frames_seen"] - 2, window["frames_seen"]))
    groups = RecallMap.unpack(mukv["recalled"]).groups
    assert set(groups) == {"g0.25", "g1.0", "g4.0"}
    assert set().union(*(g.frames() for g in groups.values())) == set(RecallMap.unpack(mukv["recalled"]).frames())


def test_page_figures_are_valid_plotly_and_name_the_evidence(runs, compare_page):
    import plotly.graph_objects as go

    data = page_data(compare_page)
    assert data["video_order"] == ["syn-s0-v0000"] and len(data["questions"]) == 3
    go.Figure(data["memory"])
    for video in data["videos"].values():
        go.Figure(video["timeline"])
    for q in data["questions"].values():
        go.Figure(q["recall"])
        frames = q["frames"]
        go.Figure({**frames, "data": [dict(t, source=data["frames"][t["source"]]) if t["type"] == "image" else t
                                      for t in frames["data"]]})
        assert {p["run"] for p in frames["layout"]["meta"]["panels"]} == set(RUNS)
        assert all(k in data["frames"] for t in frames["data"] if t["type"] == "image" for k in [t["source"]])
    (detail,) = [q for q in data["questions"].values() if "colour" in q["label"]]
    assert "row " in detail["html"] and ("✓" in detail["html"] or "✗" in detail["html"])
    buttons = detail["frames"]["layout"]["updatemenus"][0]["buttons"]
    assert [b["label"] for b in buttons] == ["all", "g0.25", "g1.0", "g4.0"]  # MuKV's granularities


def test_compare_command_and_a_folder_that_is_no_run(runs, tmp_path, capsys):
    out = tmp_path / "two.html"
    assert main([str(runs["full"]), str(runs["sliding_window"]), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "mukv explorer: full vs sliding_window" in out.read_text(encoding="utf-8")
    assert main([str(tmp_path / "nothing")]) == 2
    assert load_run(runs["mukv"]).answers  # a run folder alone is enough


def test_the_page_reads_the_run_folder_and_never_a_cache_method(runs, tmp_path):
    import subprocess
    import sys

    code = ("import sys; from mukv.report.explorer import write_explorer; "
            f"write_explorer([{str(runs['mukv'])!r}], {str(tmp_path / 'p.html')!r}); "
            "print(sorted(m for m in sys.modules if m.startswith(('mukv.cache', 'mukv.models', 'mukv.engine', 'torch'))))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"  # what was recalled comes from predictions.jsonl alone
    assert page_data(tmp_path / "p.html")["frames"]  # the frames: rendered again from the resolved config


def test_frames_of_a_video_file_are_read_from_the_file(tmp_path):
    """A run on video files (RVS's layout: an annotation file and an mp4): the page's thumbnails are the file's
    frames, decoded again from where the run's resolved config says they lie."""
    from PIL import Image

    from mukv.config import register_configs
    from mukv.train_eval import train_eval
    from mukv.video.sources import write_mp4

    colours = np.array([[230, 40, 40], [40, 200, 60], [40, 90, 240], [240, 220, 40], [170, 50, 230], [250, 140, 30]])
    frames = np.repeat(np.repeat(colours[:, None, None, :], 112, axis=1), 112, axis=2).astype(np.uint8)
    (tmp_path / "ego").mkdir()
    write_mp4(tmp_path / "ego" / "v1.mp4", frames, fps=1)
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([{"video_id": "v1", "video_path": "/data/rvs/ego/v1.mp4", "duration": 6,
                                "conversations": [{"question": "what?", "answer": "x", "start_time": 0,
                                                   "end_time": 4}]}]))
    register_configs()
    cfg = compose_cfg("dataset=rvs_ego", f"dataset.annotation={ann}", f"dataset.data_root={tmp_path}",
                      "dataset.sample_fps=1", "engine.max_new_tokens=2", "engine.progress=false")
    cfg.paths.output_dir = str(tmp_path / "run")
    train_eval(cfg, tmp_path / "run")
    data = page_data(tmp_path / "run" / EXPLORER)
    assert sorted(data["frames"]) == [f"v1#{i}" for i in range(4)]  # the 4 frames the question saw
    for i in range(4):
        uri = data["frames"][f"v1#{i}"]
        img = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).convert("RGB")).astype(int)
        assert np.abs(img.reshape(-1, 3).mean(axis=0) - colours[i]).max() < 20, i  # decoded: lossy, near
    cfg.explorer = False  # a sweep's runs can go without the page
    cfg.paths.output_dir = str(tmp_path / "no_page")
    train_eval(cfg, tmp_path / "no_page")
    assert (tmp_path / "no_page" / "predictions.csv").is_file() and not (tmp_path / "no_page" / EXPLORER).exists()


# ------------------------------------------------------------------------------------------ in a browser
@pytest.fixture(scope="module")
def browser():
    binary = next((shutil.which(b) for b in ("chromium", "chromium-browser", "google-chrome") if shutil.which(b)), None)
    driver_path = shutil.which("chromedriver")
    if not (binary and driver_path):
        pytest.fail("the explorer's browser tests need chromium and chromedriver: `make browser` installs them "
                    "(make install and make test call it)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = binary
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--force-device-scale-factor=1", "--window-size=1400,1000"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(driver_path), options=options)  # the system driver: no download
    yield driver
    driver.quit()


def open_page(driver, path: Path) -> str:
    driver.get(path.as_uri())
    return wait_shown(driver)


def wait_shown(driver, key: str | None = None, timeout: float = 20.0) -> str:
    """Wait until the page has drawn question ``key`` (any, when None); returns its key."""
    end = time.time() + timeout
    while time.time() < end:
        shown = driver.execute_script("return document.body.dataset.shown || ''")
        if shown and (key is None or shown == key):
            return shown
        time.sleep(0.05)
    raise AssertionError(f"the page did not draw question {key or '(any)'} within {timeout} s")


def errors(driver) -> list[dict]:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "WARNING")]


def screenshot(driver) -> np.ndarray:
    from PIL import Image

    height = driver.execute_script("return document.documentElement.scrollHeight")
    driver.set_window_size(1400, height + 50)
    driver.execute_script("window.scrollTo(0, 0)")
    time.sleep(0.3)  # plotly's responsive relayout
    return np.asarray(Image.open(io.BytesIO(driver.get_screenshot_as_png())).convert("RGB")).astype(int)


def test_run_page_loads_with_no_console_errors(runs, browser):
    browser.get_log("browser")  # drop anything logged before
    open_page(browser, runs["mukv"] / EXPLORER)
    assert errors(browser) == []
    assert browser.execute_script("return document.querySelectorAll('#frames .main-svg').length") > 0
    assert browser.execute_script("return document.querySelectorAll('#memory .scatterlayer .trace').length") >= 3


def test_question_selector_changes_the_overlay(compare_page, browser):
    from selenium.webdriver.support.ui import Select

    browser.get_log("browser")
    first = open_page(browser, compare_page)
    overlay = "return JSON.stringify(document.getElementById('frames').layout.meta)"
    before, details = browser.execute_script(overlay), browser.find_element("id", "details").text
    select = Select(browser.find_element("id", "question"))
    other = next(o.get_attribute("value") for o in select.options if o.get_attribute("value") != first)
    select.select_by_value(other)
    wait_shown(browser, other)
    assert browser.execute_script(overlay) != before
    assert browser.find_element("id", "details").text != details
    assert errors(browser) == []


def test_screenshot_highlights_the_needle_cell_for_the_method_that_recalled_it(compare_page, browser):
    from selenium.webdriver.support.ui import Select

    open_page(browser, compare_page)
    data = page_data(compare_page)
    (key,) = [k for k, q in data["questions"].items() if "colour" in q["label"]]
    Select(browser.find_element("id", "question")).select_by_value(key)
    wait_shown(browser, key)
    meta = browser.execute_script("return document.getElementById('frames').layout.meta")
    grid = meta["grid"]
    needle_panels = {p["run"]: p for p in meta["panels"] if p["evidence_cells"]}
    assert set(needle_panels) == set(RUNS)
    image = screenshot(browser)

    def cell_pixels(run: str) -> tuple[np.ndarray, np.ndarray]:
        """(the pixels along the top edge of the needle's cell, its inside) in the screenshot."""
        p = needle_panels[run]
        sub = p["xaxis"] + p["yaxis"]  # plotly's name of the subplot: "xy", "x3y3"
        rect = browser.execute_script(
            "const r = document.querySelector(`#frames .nsewdrag[data-subplot='${arguments[0]}']`)"
            ".getBoundingClientRect(); return [r.left, r.top, r.width, r.height];", sub)
        left, top, width, height = rect
        row, col = divmod(p["evidence_cells"][0], grid)
        x0, x1 = left + col * width / grid, left + (col + 1) * width / grid
        y0, y1 = top + row * height / grid, top + (row + 1) * height / grid
        xm = int(round((x0 + x1) / 2))
        edge = image[int(round(y0)) - 2: int(round(y0)) + 3, xm - 3: xm + 4].reshape(-1, 3)
        inside = image[int(y0) + 6: int(y1) - 5, int(x0) + 6: int(x1) - 5].reshape(-1, 3)
        return edge, inside

    def near(pixels: np.ndarray, rgb: tuple[int, int, int]) -> bool:
        return bool((np.abs(pixels - np.array(rgb)).sum(axis=1) < 90).any())

    full_edge, full_inside = cell_pixels("full")
    window_edge, window_inside = cell_pixels("sliding_window")
    assert near(full_edge, (0, 224, 0)) and not near(full_edge, (255, 32, 32))  # recalled: outlined green
    assert near(window_edge, (255, 32, 32)) and not near(window_edge, (0, 224, 0))  # missed: outlined red
    # the same frame: bright where the context held the needle, dimmed where it did not
    assert full_inside.mean() > window_inside.mean() + 25


def test_a_click_on_the_timeline_selects_that_question(compare_page, browser):
    from selenium.webdriver.common.action_chains import ActionChains

    first = open_page(browser, compare_page)
    last = browser.execute_script("return DATA.videos[DATA.video_order[0]].questions.at(-1)")
    assert last != first
    points = browser.find_elements("css selector", "#timeline .scatterlayer .trace:last-child .point")
    ActionChains(browser).move_to_element(points[-1]).pause(0.2).click().perform()  # the latest question's marker
    wait_shown(browser, last)
    assert browser.find_element("id", "question").get_attribute("value") == last
