"""`attnpipe report`: one self-contained HTML file (no request leaves it), with the expected
sections; and, in a real headless Chromium driven by Selenium, no console errors, no network
requests, and a head view that answers a hover and a click. The browser tests skip when
Debian's chromium / chromium-driver (or selenium) are not installed; `.ci/run` installs them."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from pathlib import Path

import pytest
from click.testing import CliRunner

pytest.importorskip("matplotlib")

from attnpipe.cli import cli
from attnpipe.errors import ReadError
from attnpipe.read import open_dataset
from attnpipe.read.report import build_report, write_report


SECTIONS = ["provenance", "tables", "atlas", "grids", "heatmaps", "head-view"]


@pytest.fixture(scope="session")
def report(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    result = CliRunner().invoke(cli, ["report", str(data["dense"]), "-o", str(out), "--doc", "d-anim",
                                      "--doc", "d-rain"])
    assert result.exit_code == 0, result.output
    return out


def test_report_is_one_self_contained_file(report):
    text = report.read_text()
    assert text.startswith("<!DOCTYPE html>")
    for section in SECTIONS:
        assert f'<section id="{section}">' in text
    assert "default-src 'none'" in text  # the page may not fetch anything, even by mistake
    # every src/href is inline (data:) or an anchor in the page
    for attr in re.findall(r'(?:src|href)="([^"]*)"', text):
        assert attr.startswith(("data:", "#")), attr
    assert "<link rel=\"stylesheet\"" not in text and "@import" not in text
    urls = set(re.findall(r"https?://[^\s\"'<>)]+", text))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls  # the SVG namespace is a name, never fetched
    assert text.count("data:image/png;base64,") >= 6 + 2  # grids and heatmaps


def test_head_view_data_is_the_stored_attention(report, data):
    text = report.read_text()
    payload = re.search(r'<script type="application/json" id="hv-data">(.*?)</script>', text, re.S).group(1)
    docs = json.loads(payload)["docs"]
    assert [d["doc_id"] for d in docs] == ["d-anim", "d-rain"]
    doc = docs[0]
    assert doc["layers"] == [0, 1] and doc["heads"] == ["-1", "0", "1", "2", "3", "rollout"]
    assert doc["sites"] == [""] and doc["target_tokens"] == []  # one sequence: no choice of attention
    view = doc["views"]["|1|2"]
    assert view["source"].startswith("maps")
    maps = open_dataset(data["dense"]).to_pandas("maps", {"doc_id": "d-anim", "layer": 1, "head": 2})
    row = dict(zip(maps["query_pos"], maps["weights"]))
    for q, k, w in zip(view["q"], view["k"], view["w"]):
        assert abs(row[q][k] - w) < 1e-4
    assert doc["views"]["|1|-1"]["source"].startswith("edges")  # no dense map of the head mean


def test_report_on_a_dataset_without_maps_or_head_stats(data, tmp_path):
    ds = open_dataset(data["sparse"])
    html = build_report(ds)
    assert '<section id="head-view">' in html and "No head_stats table" in html
    with pytest.raises(ReadError, match="name it .html"):
        write_report(ds, tmp_path / "r.pdf")
    with pytest.raises(ReadError, match="'nope' is not in"):
        build_report(ds, ["nope"])


def test_report_cli_needs_an_output_file(data):
    result = CliRunner().invoke(cli, ["report", str(data["dense"])])
    assert result.exit_code != 0 and "-o FILE.html" in result.output


# --- in a real browser --------------------------------------------------------------------------

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser():
    if not (CHROMIUM and CHROMEDRIVER):
        pytest.skip("no Chromium: apt-get install chromium chromium-driver")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="attnpipe-chromium-")
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 "--disable-background-networking", "--disable-component-update", "--no-first-run",
                 "--disable-sync", "--window-size=1280,1000", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The driver is Debian's chromedriver: Selenium Manager never downloads a browser or driver.
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def _errors(driver) -> list:
    return [e for e in driver.get_log("browser") if e["level"] in ("SEVERE", "ERROR")]


def test_report_opens_in_chromium_without_errors(browser, report):
    from selenium.webdriver.common.by import By

    browser.get(report.as_uri())
    assert browser.title.startswith("attnpipe report")
    shown = [s.get_attribute("id") for s in browser.find_elements(By.TAG_NAME, "section") if s.is_displayed()]
    assert shown == SECTIONS
    headings = [h.text for h in browser.find_elements(By.CSS_SELECTOR, "section h2")]
    assert headings[:3] == ["Provenance", "Tables", "Head atlas"]
    images = browser.execute_script(
        "return [...document.images].map(i => [i.complete, i.naturalWidth])")
    assert images and all(done and width > 0 for done, width in images)  # every inlined figure decodes
    requests = browser.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
    assert [r for r in requests if not r.startswith("data:")] == []
    assert _errors(browser) == []


def test_head_view_answers_hover_and_click(browser, report):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(report.as_uri())
    view = browser.find_element(By.ID, "head-view")
    browser.execute_script("arguments[0].scrollIntoView()", view)
    Select(browser.find_element(By.ID, "hv-layer")).select_by_value("1")
    Select(browser.find_element(By.ID, "hv-head")).select_by_value("2")
    info = browser.find_element(By.ID, "hv-info")
    assert info.text.startswith("Point at a token")
    assert "maps" in browser.find_element(By.ID, "hv-source").text

    def visible_lines():
        return browser.execute_script(
            "return [...document.querySelectorAll('#hv-lines line')]"
            ".filter(l => Number(l.getAttribute('opacity')) > 0).map(l => l.getAttribute('data-q'))")

    token = browser.find_element(By.CSS_SELECTOR, "#hv-svg text.tok.q[data-pos='3']")
    ActionChains(browser).move_to_element(token).perform()
    assert info.text.startswith(f"'{token.text}' (position 3) attends to: ")
    assert set(visible_lines()) == {"3"}  # only the hovered token's lines remain
    assert "active" in token.get_attribute("class")
    shaded = browser.execute_script(
        "return [...document.querySelectorAll('rect.heat')].filter(r => Number(r.getAttribute('opacity')) > 0).length")
    assert shaded > 0

    ActionChains(browser).move_to_element(token).click().perform()  # a click keeps the selection ...
    elsewhere = browser.find_element(By.ID, "hv-controls")
    ActionChains(browser).move_to_element(elsewhere).perform()
    assert info.text.startswith(f"'{token.text}' (position 3)")
    key = browser.find_element(By.CSS_SELECTOR, "#hv-svg text.tok.k[data-pos='0']")
    ActionChains(browser).move_to_element(key).perform()  # ... and hovering elsewhere does not move it
    assert info.text.startswith(f"'{token.text}' (position 3)")
    token.click()  # a second click releases it
    ActionChains(browser).move_to_element(key).perform()
    assert "is attended by" in info.text

    Select(browser.find_element(By.ID, "hv-head")).select_by_value("rollout")
    assert "rollout" in browser.find_element(By.ID, "hv-source").text
    Select(browser.find_element(By.ID, "hv-doc")).select_by_index(1)
    assert len(browser.find_elements(By.CSS_SELECTOR, "#hv-svg text.tok.q")) > 3
    assert _errors(browser) == []


def test_notebook_view_renders_inside_its_sandboxed_iframe(browser, dense, tmp_path):
    """What Jupyter shows for a dataset (`_repr_html_`): the head view in an iframe's srcdoc,
    sandboxed (scripts only), which draws its tokens and answers a hover."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    cell = tmp_path / "cell.html"
    cell.write_text(f"<!DOCTYPE html><html><body><div class='output'>{dense._repr_html_()}</div></body></html>")
    browser.get(cell.as_uri())
    frame = browser.find_element(By.TAG_NAME, "iframe")
    assert frame.get_attribute("sandbox") == "allow-scripts"
    browser.switch_to.frame(frame)
    try:
        tokens = browser.find_elements(By.CSS_SELECTOR, "#hv-svg text.tok.q")
        assert len(tokens) > 3
        ActionChains(browser).move_to_element(tokens[2]).perform()
        assert "attends to" in browser.find_element(By.ID, "hv-info").text
        assert _errors(browser) == []
    finally:
        browser.switch_to.default_content()


@pytest.fixture(scope="module")
def pair_report(tmp_path_factory, tiny_model_dir) -> Path:
    """The report of an encoder-decoder pair run (tiny BART): three attentions per layer."""
    import csv

    from conftest import invoke, write_job

    tmp = tmp_path_factory.mktemp("pair-report")
    corpus = tmp / "pairs.csv"
    with corpus.open("w", newline="") as f:
        csv.writer(f).writerows([["text", "summary"], ["The animal was too tired to cross.", "It was tired."],
                                 ["Rain fell all night on the road.", "Rain all night."]])
    recipes = '[[recipes]]\nname = "dense"\n[[recipes]]\nname = "rollout"\nk = 3\n'
    job = write_job(tmp, corpus, tiny_model_dir("bart"), recipes=recipes, extra='target_column = "summary"',
                    device="cpu")
    assert invoke("run", job).exit_code == 0
    out = tmp / "report.html"
    assert invoke("report", tmp / "out", "-o", out).exit_code == 0
    return out


def test_pair_head_view_data_has_every_attention(pair_report):
    payload = re.search(r'<script type="application/json" id="hv-data">(.*?)</script>', pair_report.read_text(),
                        re.S).group(1)
    doc = json.loads(payload)["docs"][0]
    assert doc["sites"] == ["encoder-self", "decoder-self", "decoder-cross"]
    cross = doc["views"]["decoder-cross|0|1"]
    assert max(cross["q"]) < len(doc["target_tokens"]) and max(cross["k"]) < len(doc["tokens"])
    assert max(cross["k"]) >= len(doc["target_tokens"])  # keys reach past the shorter target: source side
    assert "decoder-cross|0|rollout" not in doc["views"]  # no rollout through cross-attention


def test_pair_head_view_draws_target_against_source(browser, pair_report):
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    browser.get(pair_report.as_uri())
    browser.execute_script("arguments[0].scrollIntoView()", browser.find_element(By.ID, "head-view"))
    assert browser.find_element(By.ID, "hv-site-label").is_displayed()
    Select(browser.find_element(By.ID, "hv-site")).select_by_value("decoder-cross")
    queries = browser.find_elements(By.CSS_SELECTOR, "#hv-svg text.tok.q")
    keys = browser.find_elements(By.CSS_SELECTOR, "#hv-svg text.tok.k")
    assert len(keys) > len(queries) > 1  # target tokens on the left, the longer source on the right
    ActionChains(browser).move_to_element(queries[1]).perform()
    info = browser.find_element(By.ID, "hv-info").text
    assert f"'{queries[1].text}' (position 1) attends to: " in info
    assert _errors(browser) == []
