"""The side-by-side site (python -m shared.site): built from the scripts, each diff page holding
exactly difflib's diff of its two files, and every page opened in a real headless Chromium."""
import difflib
import io
import itertools
import os
import re
import shutil
from html.parser import HTMLParser

import matplotlib.image
import pytest

from conftest import ALL_STAGES, CHAIN, ON_TRUNK, ROOT, stage_error
from shared import description, site

# the diffs: of the chain, 01 to 09; a stage built on 09 is read whole
PAIRS = list(itertools.pairwise(CHAIN))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return site.build(tmp_path_factory.mktemp("site") / "site")


def changed_lines(pair):
    """difflib's changed lines of the pair's files: those removed, those added."""
    old, new = (site.lines_of((ROOT / f"{name}.py").read_text()) for name in pair)
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    opcodes = [op for op in matcher.get_opcodes() if op[0] != "equal"]
    return ([line for _, i1, i2, _, _ in opcodes for line in old[i1:i2]],
            [line for *_, j1, j2 in opcodes for line in new[j1:j2]])


class Cells(HTMLParser):
    """The text of each <code class=...> of a page, by its class."""

    def __init__(self):
        super().__init__()
        self.cells, self.open = {}, None

    def handle_starttag(self, tag, attrs):
        if tag == "code" and dict(attrs).get("class") in ("del", "add", "same"):
            self.open = dict(attrs)["class"]
            self.cells.setdefault(self.open, []).append("")

    def handle_endtag(self, tag):
        if tag == "code":
            self.open = None

    def handle_data(self, data):
        if self.open:
            self.cells[self.open][-1] += data


def test_each_diff_page_holds_both_sides_of_every_changed_line_and_the_sizes(built):
    for pair in PAIRS:
        text = (built / f"{pair[0]}-{pair[1]}.html").read_text()
        cells = Cells()
        cells.feed(text)
        removed, added = changed_lines(pair)
        assert cells.cells.get("del", []) == removed and cells.cells.get("add", []) == added
        assert (f"{len(removed) + len(added)} lines changed ({len(removed)} removed, "
                f"{len(added)} added), ") in text
    # in the budget's measure (one small pair: the measure takes a while on the large ones)
    tokens = site.changed_tokens(*((ROOT / f"{name}.py").read_text() for name in PAIRS[1]))
    assert f"{tokens:,} tokens by the budget's measure" in (built / "-".join(PAIRS[1])).with_suffix(
        ".html").read_text()


def test_a_stage_page_is_its_whole_script_and_the_index_links_every_page(built):
    for name in ALL_STAGES:
        cells = Cells()
        cells.feed((built / f"{name}.html").read_text())
        assert cells.cells["same"] == site.lines_of((ROOT / f"{name}.py").read_text())
    index = (built / "index.html").read_text()
    links = set(re.findall(r'href="([^"#]+\.html)"', index))
    assert links == ({f"{name}.html" for name in ALL_STAGES} | {f"{a}-{b}.html" for a, b in PAIRS}
                     | {"readme.html"})
    # what each stage adds: the first line of its docstring
    assert all(site.inline(description(name)) in index for name in ALL_STAGES)
    # the README has its page, which the notes' way back leads to
    assert "one idea at a time" in (built / "readme.html").read_text()
    assert 'href="readme.html"' in (built / "05_gpt.html").read_text()
    # a stage built on 09 and 09 link each other, and no diff leads to it or from it
    trunk = (built / "09_lora.html").read_text()
    for name in ON_TRUNK:
        nav = re.search(r"<nav>(.*?)</nav>", (built / f"{name}.html").read_text()).group(1)
        assert '<a href="09_lora.html">builds on 09_lora</a>' in nav and "diff" not in nav
        assert f'<a href="{name}.html">built on it: {name}</a>' in trunk
    assert not list(built.glob("*-1[0-9]_*.html"))


def test_a_stage_page_shows_its_notes_and_every_link_of_the_site_leads_somewhere(built):
    """docs/<stage>.md on the stage's page (open) and on the diff that leads to it (folded), its
    headings under the page's title; each link to a page of the site, a picture or an anchor
    finds it there."""
    for name in ALL_STAGES:
        page = (built / f"{name}.html").read_text()
        if not (ROOT / "docs" / f"{name}.md").exists():
            assert 'class="notes"' not in page
            continue
        assert f'<details class="notes" open><summary>Notes on {name}.py' in page
        assert f'<h2 id="stage-{name[:2]}-' in page and page.count("<h1>") == 1
        if name in CHAIN:
            previous = CHAIN[CHAIN.index(name) - 1]
            diff = (built / f"{previous}-{name}.html").read_text()
            assert '<details class="notes"><summary>' in diff
    notes = (built / "07_modern.html").read_text()
    assert '<td>zeros: every block starts as the identity</td>' in notes  # a table
    assert 'href="06_train_for_real.html#training-on-a-corpus-of-any-size"' in notes
    ids = {page.name: set(re.findall(r' id="([^"]+)"', page.read_text()))
           for page in built.glob("*.html")}
    for page in built.glob("*.html"):
        for target in re.findall(r' (?:href|src)="([^"]+)"', page.read_text()):
            if target.startswith("https:"):
                continue
            path, _, anchor = target.partition("#")
            assert (built / (path or page.name)).is_file(), f"{page.name}: {target}"
            if anchor:
                assert anchor in ids[path or page.name], f"{page.name}: {target}"


def test_a_line_wraps_at_its_spaces_and_a_changed_pair_marks_its_changed_words():
    line = 'lr=8e-3, name="x-y"  # a comment'
    rendered = site.render(site.highlighted(line + "\n")[0])
    runs = [re.sub(r"<[^>]+>", "", run) for run in re.findall(
        r'<span class="run">((?:<span[^>]*>[^<]*</span>|[^<])*)</span>', rendered)]
    assert runs == ["lr=8e-3,", 'name="x-y"', "#"]  # each kept whole; "a", "comment" can't break
    assert re.sub(r"<[^>]+>", "", rendered) == line
    # line 9 of stages 01 and 02 differ in their numbers
    old, new = "in 5 s, 2.49 after", "in 9 s, 2.37 after"
    assert site.changed_ranges(old, new) == ([(3, 4), (10, 12)], [(3, 4), (10, 12)])
    marked = site.render(site.highlighted(old + "\n")[0], [(3, 4), (10, 12)])
    assert re.findall(r'class="[^"]*changed[^"]*">([^<]*)<', marked) == ["5", "49"]
    # two different lines are not one line changed: nothing marked
    assert site.changed_ranges("import math", "    return x.mean()") == ([], [])


def test_a_folder_of_something_else_is_not_replaced(built, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    (tmp_path / "index.html").write_text("<p>my own page</p>")
    message = stage_error(capsys, site.main, "--out", str(tmp_path))
    assert "holds something other than a site" in message and (tmp_path / "notes.txt").exists()
    # what a build wrote is known as such, and a new build replaces it
    assert site.built_here(built) and not site.built_here(tmp_path)


def browser():
    """Chromium, headless, through its WebDriver; in CI it must be there (.ci/run installs it),
    elsewhere the test says why it did not run."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        if os.environ.get("CI"):
            pytest.fail("CI needs chromium and chromedriver (apt-get install chromium "
                        "chromium-driver)")
        pytest.skip("no chromium and chromedriver here (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1400,900"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    os.environ["SE_OFFLINE"] = "true"  # nothing to download: the driver is given
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(driver))


def errors(driver):
    return [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]


def not_blank(png):
    return matplotlib.image.imread(io.BytesIO(png), format="png").std() > 0.05


def test_every_page_opens_in_chromium_without_errors_and_folds_unfold(built):
    driver = browser()
    wide = "return document.documentElement.scrollWidth <= window.innerWidth"
    try:
        # on a laptop's width (the window the browser starts with)
        for page in sorted(built.glob("*.html")):
            driver.get(page.as_uri())
            assert errors(driver) == [], page.name
            # the stylesheet is there (without it the page has no background of its own)
            assert driver.execute_script(
                "return getComputedStyle(document.body).backgroundColor") != "rgba(0, 0, 0, 0)"
            # no page wider than the window (the index, the stages, the diffs)
            assert driver.execute_script(wide), page.name
            pair = tuple(page.stem.split("-"))
            if pair in PAIRS:
                # both sides of every changed line, in the page the browser built
                shown = driver.execute_script(
                    "return ['del', 'add'].map(kind => [...document.querySelectorAll("
                    "'code.' + kind)].map(cell => cell.textContent))")
                assert tuple(shown) == changed_lines(pair), pair
        pair = PAIRS[-1]
        driver.get((built / f"{pair[0]}-{pair[1]}.html").as_uri())
        fold = driver.find_element("css selector", "details.fold")
        hidden = fold.find_element("css selector", "div.row code")
        assert not hidden.is_displayed()
        fold.find_element("css selector", "summary").click()
        assert hidden.is_displayed()
        assert not_blank(driver.get_screenshot_as_png())
        # a link to a folded line unfolds it
        line = driver.execute_script(
            "return document.querySelector('details.fold:not([open]) a.ln').id")
        driver.get((built / f"{pair[0]}-{pair[1]}.html").as_uri() + f"#{line}")
        assert driver.find_element("id", line).is_displayed()
        # a changed pair of lines marks the words that differ: line 9 of 01 -> 02, "5 s", "9 s"
        driver.get((built / f"{PAIRS[0][0]}-{PAIRS[0][1]}.html").as_uri())
        marks = driver.execute_script(
            "const row = document.getElementById('L9').closest('.row');"
            "return ['del', 'add'].map(kind => [...row.querySelectorAll("
            "'code.' + kind + ' .changed')].map(mark => mark.textContent))")
        assert "5" in marks[0] and "9" in marks[1], marks
        # on a laptop's width and on a phone's: no token split over two lines (a line wraps at its
        # spaces); on a phone's, no page wider than the window either
        for width in (1400, 400):
            driver.set_window_size(width, 800)
            driver.get((built / "04_block-05_gpt.html").as_uri())
            split = driver.execute_script(
                "return [...document.querySelectorAll('.row code span')].filter(span => "
                "!/\\s/.test(span.textContent) && new Set([...span.getClientRects()].map("
                "rect => Math.round(rect.top))).size > 1).map(span => span.textContent)")
            assert split == [], (width, split[:5])
            # on a phone a change's old lines all above its new ones, side by side on a laptop
            tops = driver.execute_script(
                "const block = [...document.querySelectorAll('.block')].find(b => "
                "b.querySelectorAll('.side.del').length > 1 && "
                "b.querySelectorAll('.side.add').length > 1);"
                "return ['del', 'add'].map(kind => [...block.querySelectorAll("
                "'.side.' + kind + ' code')].map(code => code.getBoundingClientRect().top));")
            assert (max(tops[0]) < min(tops[1])) == (width == 400), (width, tops)
        for page in sorted(built.glob("*.html")):
            driver.get(page.as_uri())
            assert driver.execute_script(wide), page.name
        # on a phone's width, one side above the other, and still readable; the index a list
        assert not_blank(driver.get_screenshot_as_png())
        driver.get((built / "index.html").as_uri())
        assert driver.find_element("css selector", ".stages td:nth-child(2)").is_displayed()
        assert not_blank(driver.get_screenshot_as_png())
        assert errors(driver) == []
    finally:
        driver.quit()
