"""The README and docs/ against the code: one row per stage, whose description is the first line
of the stage's docstring; the diffs' sizes as measured, with tests/test_diffs.py's budgets, and
the sizes of the stages built on 09; a page of notes per stage from 05 on; links that lead
somewhere."""
import ast
import re
from urllib.parse import unquote

from conftest import ALL_STAGES, ON_TRUNK, ROOT
from shared import description, site, stages
from test_diffs import BUDGETS, PAIRS, SIZES

README = ROOT / "README.md"
# the stages with a page of notes in docs/
NOTED = [name for name in ALL_STAGES if name >= "05"]


def table(text, header):
    """The rows of the Markdown table whose header row is header, each a list of its cells."""
    lines = text.splitlines()
    start = lines.index(header) + 2  # past the header and the row of dashes
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split(" | ")])
    return rows


def test_the_stages_are_the_numbered_scripts():
    assert stages() == ALL_STAGES


def test_the_readme_has_one_row_per_stage_that_says_what_its_docstring_says():
    rows = table(README.read_text(), "| script | what it adds | parameters | val loss | time |")
    names = [re.search(r"`(\d\d_\w+)\.py`", row[0]).group(1) for row in rows]
    assert names == ALL_STAGES
    for name, row in zip(names, rows, strict=True):
        assert row[1] == description(name), name
        # measured numbers in the other three columns
        assert len(row) == 5 and all(re.match(r"[\d,.]+", cell) for cell in row[2:]), row
        # from stage 05 on, the script links its notes
        link = f"[`{name}.py`](docs/{name}.md)"
        assert (row[0] == link) == (name in NOTED), row[0]


def test_each_stage_from_05_on_has_its_page_of_notes():
    assert sorted(path.stem for path in (ROOT / "docs").glob("*.md")) == NOTED
    for name in NOTED:
        text = (ROOT / "docs" / f"{name}.md").read_text()
        assert text.startswith(f"# Stage {name[:2]}: "), name
        assert "](../README.md)" in text.split("\n\n")[1], name  # the way back, at the top


def test_the_diff_table_holds_the_measured_sizes_and_the_budgets():
    """Lines as the site counts them (difflib), tokens by the budget's measure, the budgets of
    tests/test_diffs.py. The message of a failure is the table as it should be."""
    measured = site.diff_table(site.diff_sizes(site.read_sources())).splitlines()[2:]
    expected = [f"{row} {BUDGETS[pair]:,} |" for row, pair in zip(measured, PAIRS, strict=True)]
    header = "| diff | lines | tokens | budget |"
    rows = table(README.read_text(), header)
    found = ["| " + " | ".join(row) + " |" for row in rows]
    assert found == expected, "\n".join([header, "|---|---:|---:|---:|", *expected])


def test_the_size_table_holds_the_measured_sizes_and_the_budgets():
    """A stage built on 09 is read whole, not as a diff: its lines, and tests/test_diffs.py's
    ceiling for them."""
    rows = table(README.read_text(), "| stage built on 09 | lines | budget |")
    lines = {name: len((ROOT / f"{name}.py").read_text().splitlines()) for name in ON_TRUNK}
    assert rows == [[f"`{name}.py`", f"{lines[name]:,}", f"{SIZES[name]:,}"] for name in ON_TRUNK]


def test_the_quick_start_keeps_its_two_commands():
    text = README.read_text()
    for command in ("python3 -m venv .venv && . .venv/bin/activate && pip install -r "
                    "requirements.txt && python 01_bigram.py",
                    "python3 -m venv .venv && . .venv/bin/activate && pip install -r "
                    "requirements-dev.txt && python -m pytest -q"):
        assert f"```bash\n{command}\n```" in text


def test_every_link_between_the_readme_and_the_notes_leads_somewhere():
    """Each relative link names a file that is there, and each #anchor a heading of its page
    (as GitHub makes anchors: site.slug)."""
    pages = [README, *sorted((ROOT / "docs").glob("*.md"))]
    for page in pages:
        text = page.read_text()
        # links and pictures, outside code blocks
        prose = re.sub(r"```.*?```", "", text, flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", prose):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path, _, anchor = unquote(target).partition("#")
            linked = (page.parent / path).resolve() if path else page
            assert linked.exists(), f"{page.name}: {target}"
            if anchor:
                assert anchor in site.heading_slugs(linked.read_text()), f"{page.name}: {target}"


def test_the_times_a_docstring_gives_are_the_tables():
    """A stage's docstring says how long it ran, and how long the stages it compares with or
    starts from ran: the README's time column, measured in one set of runs."""
    rows = table(README.read_text(), "| script | what it adds | parameters | val loss | time |")
    seconds = {re.search(r"`(\d\d_\w+)\.py`", row[0]).group(1): row[4] for row in rows}
    # (the stage whose docstring says it, what it says, the stage it is the time of)
    said = [("05_gpt", r"in (\d+ s) on a 2-core CPU", "05_gpt"),
            ("08_chat", r"(\d+ s) on a 2-core CPU", "08_chat"),
            ("08_chat", r"after stage 07's run, (\d+ s)", "07_modern"),
            ("09_lora", r"(\d+ s) on a 2-core CPU", "09_lora"),
            ("09_lora", r"where stage 08 took (\d+ s)", "08_chat"),
            ("10_dpo", r"(\d+ s) on a 2-core CPU", "10_dpo"),
            ("12_serve", r"2-core CPU, ([\d.]+ s) to start", "12_serve")]
    for name, pattern, timed in said:
        docstring = ast.get_docstring(ast.parse((ROOT / f"{name}.py").read_text()))
        found = re.search(pattern, " ".join(docstring.split()))
        assert found and found.group(1) == seconds[timed], (name, pattern)


def test_the_serving_rate_the_docstring_gives_is_the_tables():
    """Stage 12's docstring, its README row and the README's table of serving give the same
    tokens a second at 16 clients, as measured by tests/bench.py serve."""
    rows = table(README.read_text(), "| script | what it adds | parameters | val loss | time |")
    rate = next(row[3] for row in rows if "12_serve" in row[0])
    serving = table(README.read_text(), "| clients | continuous batching: tokens/s | first token, "
                    "p50 | batching off: tokens/s | first token, p50 |")
    assert rate == f"{serving[-1][1]} tok/s (16 clients)" and serving[-1][0] == "16"
    docstring = " ".join(ast.get_docstring(ast.parse((ROOT / "12_serve.py").read_text())).split())
    found = re.search(r"Sixteen clients at once get (\d+) tokens a second", docstring)
    assert found and rate == f"{found.group(1)} tok/s (16 clients)"
