"""python -m shared.site: the stages and the diff of each pair of consecutive stages of the chain
(01 to 09) side by side, and each stage built on 09 whole, as a static site of plain HTML and CSS
(highlighted by Pygments) that opens from its folder or from GitHub Pages.

    python -m shared.site --out site    # then open site/index.html
    python -m shared.site --diff-table  # the README's table of the diffs' sizes

The diffs are difflib's, over the lines of the two files, and within a changed pair of lines over
their words, which are marked; their sizes are counted as the diff test counts them
(changed_tokens, the budget's measure). A stage's page, and the diff that leads
to it, also show its notes, docs/<stage>.md, rendered by markdown-it-py.
"""
import argparse
import ast
import difflib
import html
import io
import itertools
import re
import shutil
import tokenize
from pathlib import Path

from shared import ROOT, TRUNK, UserError, built_on_trunk, chain, description, stages
from shared.cli import run

# in every page, so that a folder can be told to be a site built before, and rebuilt
GENERATOR = "python -m shared.site"
# unchanged lines shown either side of a change; a longer unchanged stretch is folded
CONTEXT = 4
# what tokenize yields that layout alone decides
LAYOUT = {tokenize.NEWLINE, tokenize.NL, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER,
          tokenize.ENCODING}


# ------------------------------------------------------------------------------ the diff's size

def words(source):
    """A script as the diff budget counts it: Python's tokens, a comment or a string counting one
    token a word; newlines, indentation and commas free, so that layout costs nothing."""
    out = []
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type in LAYOUT or token.string == ",":
            continue
        if token.type == tokenize.COMMENT:
            out.extend(token.string.lstrip("#").split())
        elif token.type == tokenize.STRING:
            out.extend(token.string.split())
        else:
            out.append(token.string)
    return out


def changed(before, after):
    """Items removed plus items added from the list before to the list after, by the opcodes of
    difflib's matcher (without its junk heuristic, which would skip common items)."""
    matcher = difflib.SequenceMatcher(None, before, after, autojunk=False)
    return sum(i2 - i1 + j2 - j1 for op, i1, i2, j1, j2 in matcher.get_opcodes() if op != "equal")


def changed_tokens(before, after):
    """The budget's measure of the diff between two scripts (tests/test_diffs.py holds each pair of
    stages to its budget): tokens removed plus tokens added, by their words."""
    return changed(words(before), words(after))


def lines_of(source):
    return source.split("\n")[:-1] if source.endswith("\n") else source.split("\n")


def diff_sizes(sources):
    """{(before, after): (lines removed, lines added, tokens changed)} for each pair of consecutive
    stages of the chain, given the sources by name: difflib's changed lines, as a diff page shows
    them, and the budget's measure."""
    sizes = {}
    for before, after in itertools.pairwise(chain()):
        old, new = lines_of(sources[before]), lines_of(sources[after])
        matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
        opcodes = [op for op in matcher.get_opcodes() if op[0] != "equal"]
        sizes[before, after] = (sum(i2 - i1 for _, i1, i2, _, _ in opcodes),
                                sum(j2 - j1 for *_, j1, j2 in opcodes),
                                changed_tokens(sources[before], sources[after]))
    return sizes


def diff_table(sizes):
    """The README's table of the diffs' sizes, without its budgets (tests/test_diffs.py's)."""
    rows = ["| diff | lines | tokens |", "|---|---:|---:|"]
    for (before, after), (removed, added, tokens) in sizes.items():
        rows.append(f"| {before[:2]} → {after[:2]} | {removed + added} | {tokens:,} |")
    return "\n".join(rows)


def read_sources():
    """Every stage's script, by its name, in order."""
    return {name: (ROOT / f"{name}.py").read_text(encoding="utf-8") for name in stages()}


# ------------------------------------------------------------------------- a stage's notes

def slug(text):
    """A heading's anchor as GitHub makes it, so that a link to #a-heading works there and here:
    lower case, punctuation out, a hyphen for each space."""
    return re.sub(r"[^\w\- ]", "", text.lower()).replace(" ", "-")


def heading_slugs(markdown):
    """The anchor of every heading of a Markdown text, in order."""
    tokens = markdown_parser().parse(markdown)
    return [slug(plain(tokens[k + 1])) for k, token in enumerate(tokens)
            if token.type == "heading_open"]


def plain(inline):
    """An inline token's text without its markup."""
    return "".join(child.content for child in inline.children
                   if child.type in ("text", "code_inline"))


def markdown_parser():
    from markdown_it import MarkdownIt
    # CommonMark and GitHub's tables; no raw HTML
    return MarkdownIt("commonmark", {"html": False}).enable("table")


# where a link in docs/ or in the README goes on the site: a stage's notes or script is its page,
# the README its own page
SITE_LINKS = [(r"(?:\.\./docs/|docs/|)(\d\d_\w+)\.md(#.*)?", r"\1.html\2"),
              (r"(?:\.\./|)(\d\d_\w+)\.py", r"\1.html"),
              (r"(?:\.\./|)README\.md(#.*)?", r"readme.html\1"),
              (r"(?:\.\./|)assets/(.+)", r"assets/\1")]


def site_link(href):
    for pattern, replacement in SITE_LINKS:
        if re.fullmatch(pattern, href):
            return re.sub(pattern, replacement, href)
    return href


def notes(name, path=None):
    """docs/<name>.md (or the Markdown file at path) as HTML for the site ("" if the stage has no
    notes): its headings one level down, under the page's own title, each with GitHub's anchor;
    its links made the site's."""
    path = path or ROOT / "docs" / f"{name}.md"
    if not path.is_file():
        return ""
    parser = markdown_parser()
    tokens = parser.parse(path.read_text(encoding="utf-8"))
    for k, token in enumerate(tokens):
        if token.type in ("heading_open", "heading_close"):
            token.tag = f"h{min(int(token.tag[1]) + 1, 6)}"
        if token.type == "heading_open":
            token.attrSet("id", slug(plain(tokens[k + 1])))
        for child in token.children or []:
            if child.type == "link_open":
                child.attrSet("href", site_link(child.attrGet("href")))
            elif child.type == "image":
                child.attrSet("src", site_link(child.attrGet("src")))
    return parser.renderer.render(tokens, parser.options, {})


def notes_section(name, open_=True):
    html_ = notes(name)
    if not html_:
        return ""
    return (f'<details class="notes"{" open" if open_ else ""}><summary>Notes on {name}.py '
            f"(docs/{name}.md)</summary>\n{html_}</details>\n")


# ---------------------------------------------------------------------------------- the pages

def inline(text):
    """A line of text as HTML: escaped, its `code` in <code>."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", html.escape(text, quote=False))


def prose(docstring):
    """A stage's docstring as HTML: its paragraphs, and its indented lines as commands."""
    parts = []
    for paragraph in docstring.strip().split("\n\n"):
        text, commands = [], []
        for line in paragraph.splitlines():
            (commands if line.startswith("    ") else text).append(line.strip())
        if text:
            parts.append(f"<p>{html.escape(' '.join(text))}</p>")
        if commands:
            parts.append(f"<pre>{html.escape(chr(10).join(commands))}</pre>")
    return "\n".join(parts)


def highlighted(source):
    """Each line of a script as its highlighted pieces, [(Pygments' CSS class, text), ...]."""
    from pygments.lexers import PythonLexer
    from pygments.token import STANDARD_TYPES
    lines = [[]]
    for kind, text in PythonLexer(stripnl=False, ensurenl=True).get_tokens(source):
        while kind not in STANDARD_TYPES:  # a kind of token is styled as its parent
            kind = kind.parent
        for k, part in enumerate(text.split("\n")):
            if k:
                lines.append([])
            if part:
                lines[-1].append((STANDARD_TYPES[kind], part))
    lines.pop()  # after the last newline
    assert len(lines) == len(lines_of(source)), "Pygments changed the number of lines"
    return lines


def render(pieces, marked=()):
    """A line's highlighted pieces as HTML. Each run of characters without a space is kept whole
    (class run, where it holds more than letters, digits and _), so that a line wraps at its
    spaces only, never inside 8e-3 or self.lm_head(x). The
    characters in the ranges marked, [(start, end), ...], are marked as changed (class changed)."""
    edges = sorted({i for span in marked for i in span})
    fragments, position = [], 0  # (classes, text), each text all spaces or none
    for kind, text in pieces:
        cuts = [i - position for i in edges if position < i < position + len(text)]
        for a, b in itertools.pairwise([0, *cuts, len(text)]):
            changed = any(start <= position < end for start, end in marked)
            classes = " ".join(c for c in (kind, "changed" if changed else "") if c)
            fragments += [(classes, part) for part in re.split(r"(\s+)", text[a:b]) if part]
            position += b - a
    out = []
    for space, group in itertools.groupby(fragments, key=lambda fragment: fragment[1].isspace()):
        inner = []
        # spaces need no colour, only a mark
        group = [("changed" if "changed" in c else "", t) if space else (c, t) for c, t in group]
        for classes, same in itertools.groupby(group, key=lambda fragment: fragment[0]):
            text = html.escape("".join(t for _, t in same), quote=False)
            inner.append(f'<span class="{classes}">{text}</span>' if classes else text)
        # letters, digits and _ alone never break; a run with anything else is kept whole
        whole = space or not re.search(r"\W", "".join(t for _, t in group))
        out.append("".join(inner) if whole else f'<span class="run">{"".join(inner)}</span>')
    return "".join(out)


def changed_ranges(old, new):
    """The characters that differ between two lines, by difflib over their words (and the spaces
    and punctuation between them): ([(start, end), ...] of old, the same of new). Nothing is marked
    when the lines have less than half their words in common: then they are two different lines,
    not one line changed."""
    a, b = re.findall(r"\w+|\s+|[^\w\s]", old), re.findall(r"\w+|\s+|[^\w\s]", new)
    matcher = difflib.SequenceMatcher(None, a, b, autojunk=False)
    if matcher.ratio() < 0.5:
        return [], []
    starts_a = [0, *itertools.accumulate(map(len, a))]
    starts_b = [0, *itertools.accumulate(map(len, b))]
    ranges = ([], [])
    for op, i1, i2, j1, j2 in matcher.get_opcodes():
        if op != "equal":
            if i2 > i1:
                ranges[0].append((starts_a[i1], starts_a[i2]))
            if j2 > j1:
                ranges[1].append((starts_b[j1], starts_b[j2]))
    return ranges


def page(title, body, up=""):
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="{GENERATOR}">
<title>{html.escape(title)}</title>
<link rel="stylesheet" href="{up}style.css">
</head>
<body>
{body}
<script>
// a link to a folded line unfolds it
function unfold() {{
  const target = location.hash && document.getElementById(location.hash.slice(1));
  for (let node = target; node; node = node.parentElement) {{
    if (node.tagName === "DETAILS") node.open = true;
  }}
  if (target) target.scrollIntoView({{block: "center"}});
}}
addEventListener("hashchange", unfold);
unfold();
</script>
</body>
</html>
"""


def nav(links):
    return "<nav>" + " · ".join(links) + "</nav>"


def number(side, n):
    """A line number that is its line's link."""
    return f'<a class="ln" id="{side}{n}" href="#{side}{n}">{n}</a>'


def side(kind, number_html, code):
    """A line of one side: its number and its code, together (class side), so that on a phone a
    change's old lines can go above its new ones."""
    return f'<span class="side {kind}">{number_html}<code class="{kind}">{code}</code></span>'


EMPTY = '<span class="side empty"><span class="ln"></span><code class="empty"></code></span>'


def diff_rows(before, after):
    """The rows of the side-by-side diff of two scripts (lists of lines, and of their highlighted
    pieces): changed lines on both sides, paired, the words that changed within a pair marked;
    unchanged stretches longer than twice CONTEXT folded into a <details> that unfolds."""
    (old, old_pieces), (new, new_pieces) = before, after
    matcher = difflib.SequenceMatcher(None, old, new, autojunk=False)
    out = []
    opcodes = matcher.get_opcodes()
    for index, (op, i1, i2, j1, j2) in enumerate(opcodes):
        if op == "equal":
            rows = [f'<div class="row same">'
                    f'{side("same", number("L", i + 1), render(old_pieces[i]))}'
                    f'{side("same", number("R", j + 1), render(new_pieces[j]))}</div>'
                    for i, j in zip(range(i1, i2), range(j1, j2), strict=True)]
            # context after the change before, and before the change after
            head = CONTEXT if index > 0 else 0
            tail = CONTEXT if index < len(opcodes) - 1 else 0
            if len(rows) > head + tail + 2 * CONTEXT:
                folded = rows[head:len(rows) - tail]
                out.extend(rows[:head])
                out.append(f'<details class="fold"><summary>{len(folded)} unchanged lines '
                           f"({i1 + head + 1}–{i1 + head + len(folded)} of the left)</summary>"
                           + "".join(folded) + "</details>")
                out.extend(rows[len(rows) - tail:])
            else:
                out.extend(rows)
            continue
        block = []
        for k in range(max(i2 - i1, j2 - j1)):
            i, j = i1 + k, j1 + k
            marks = changed_ranges(old[i], new[j]) if i < i2 and j < j2 else ([], [])
            left = (side("del", number("L", i + 1), render(old_pieces[i], marks[0]))
                    if i < i2 else EMPTY)
            right = (side("add", number("R", j + 1), render(new_pieces[j], marks[1]))
                     if j < j2 else EMPTY)
            block.append(f'<div class="row changed">{left}{right}</div>')
        # a change's rows together: on a phone its old lines go above its new ones
        out.append(f'<div class="block">{"".join(block)}</div>')
    return out


def stage_page(name, previous, following, intro, source_pieces):
    """A stage's page: its notes and its whole script, with links to the diffs from the stage
    before and to the one after, or, for a stage built on the trunk, to the trunk's page; the
    trunk's links to the stages built on it."""
    links = ['<a href="index.html">all stages</a>']
    if name in built_on_trunk():
        links.append(f'<a href="{TRUNK}.html">builds on {TRUNK}</a>')
    if previous:
        links.append(f'<a href="{previous}-{name}.html">diff from {previous}</a>')
    if following:
        links.append(f'<a href="{name}-{following}.html">diff to {following}</a>')
    if name == TRUNK:
        links += [f'<a href="{later}.html">built on it: {later}</a>' for later in built_on_trunk()]
    rows = "".join(f'<div class="row whole">{side("same", number("L", n), render(pieces))}</div>'
                   for n, pieces in enumerate(source_pieces, 1))
    body = (f"{nav(links)}\n<h1>{name}.py</h1>\n<section class=\"intro\">{intro}</section>\n"
            f'{notes_section(name)}<div class="code whole">{rows}</div>')
    return page(f"{name}.py", body)


def pair_page(pair, neighbours, size, intro, rows):
    before, after = pair
    links = ['<a href="index.html">all stages</a>']
    if neighbours[0]:
        links.append(f'<a href="{"-".join(neighbours[0])}.html">← {neighbours[0][0]} → '
                     f"{neighbours[0][1]}</a>")
    if neighbours[1]:
        links.append(f'<a href="{"-".join(neighbours[1])}.html">{neighbours[1][0]} → '
                     f"{neighbours[1][1]} →</a>")
    removed, added, tokens = size
    body = (f"{nav(links)}\n<h1>{before}.py → {after}.py</h1>\n"
            f'<p class="size">{removed + added} lines changed ({removed} removed, {added} added), '
            f"{tokens:,} tokens by the budget's measure</p>\n"
            f'<section class="intro">{intro}</section>\n{notes_section(after, open_=False)}'
            f'<div class="code diff"><div class="row titles"><span></span>'
            f'<a href="{before}.html">{before}.py</a><span></span>'
            f'<a href="{after}.html">{after}.py</a></div>{"".join(rows)}</div>')
    return page(f"{before}.py → {after}.py", body)


def readme_page():
    """The README, as the site's page of it: what a stage's notes link to."""
    links = ['<a href="index.html">all stages</a>']
    body = f'{nav(links)}\n<div class="notes readme">{notes("README", ROOT / "README.md")}</div>'
    return page("LLM from scratch, one idea at a time: the README", body)


def index_page(names, sizes, sources):
    rows = []
    for name in names:
        diff = ""
        for (before, after), (removed, added, tokens) in sizes.items():
            if after == name:
                diff = (f'<a href="{before}-{name}.html">{removed + added} lines, '
                        f"{tokens:,} tokens</a>")
        if name in built_on_trunk():
            diff = (f'builds on <a href="{TRUNK}.html">{TRUNK}</a>, whole: '
                    f"{len(lines_of(sources[name])):,} lines")
        rows.append(f'<tr><td><a href="{name}.html">{name}.py</a></td>'
                    f'<td>{inline(description(name))}</td><td class="diff">{diff}</td></tr>')
    body = ("<h1>LLM from scratch, one idea at a time</h1>\n<p>Up to stage 09 each stage is one "
            "script, the one before it plus one idea: open a stage to read it whole, with its "
            "notes, or the diff beside it to see exactly what its idea changed. From stage 10 on, "
            "a stage builds on stage 09 by importing it and holds only its own idea: read it "
            'whole. <a href="readme.html">The README</a> says what each stage measured, how to '
            "run it, and what it needs.</p>\n"
            '<table class="stages"><thead><tr><th>script</th><th>what it adds</th>'
            "<th>diff from the one before</th></tr></thead><tbody>" + "".join(rows)
            + "</tbody></table>")
    return page("LLM from scratch, one idea at a time", body)


def style():
    """site.css, then Pygments' colours for its classes, light and dark."""
    from pygments.formatters import HtmlFormatter
    light = HtmlFormatter(style="default").get_style_defs(".code")
    dark = HtmlFormatter(style="github-dark").get_style_defs(".code")
    return (Path(__file__).with_name("site.css").read_text() + "\n" + light
            + "\n@media (prefers-color-scheme: dark) {\n" + dark + "\n}\n")


def built_here(folder):
    index = folder / "index.html"
    return index.is_file() and f'content="{GENERATOR}"' in index.read_text(errors="replace")


def build(out):
    """The site, written into the folder out (made, or emptied of a site built before)."""
    out = Path(out)
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not built_here(out)):
        raise UserError(f"--out {out} holds something other than a site built by {GENERATOR}; "
                        "name a new folder")
    names = stages()
    sources = read_sources()
    lines = {name: (lines_of(source), highlighted(source)) for name, source in sources.items()}
    intros = {name: prose(ast.get_docstring(ast.parse(source)) or "")
              for name, source in sources.items()}
    pairs = list(itertools.pairwise(chain()))
    sizes = diff_sizes(sources)
    index = index_page(names, sizes, sources)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    # the index first: it tells a later build that the folder is a site, even one left half built
    (out / "index.html").write_text(index)
    (out / "style.css").write_text(style())
    (out / "readme.html").write_text(readme_page())
    if (ROOT / "assets").is_dir():  # the pictures the notes show
        shutil.copytree(ROOT / "assets", out / "assets")
    for name in names:
        previous = next((before for before, after in pairs if after == name), None)
        following = next((after for before, after in pairs if before == name), None)
        (out / f"{name}.html").write_text(stage_page(name, previous, following, intros[name],
                                                     lines[name][1]))
    for k, pair in enumerate(pairs):
        neighbours = (pairs[k - 1] if k else None, pairs[k + 1] if k + 1 < len(pairs) else None)
        rows = diff_rows(lines[pair[0]], lines[pair[1]])
        (out / f"{pair[0]}-{pair[1]}.html").write_text(
            pair_page(pair, neighbours, sizes[pair], intros[pair[1]], rows))
    return out


def main(argv=None):
    description = __doc__.split("\n\n")[0]
    parser = argparse.ArgumentParser(prog="python -m shared.site", description=description)
    parser.add_argument("--out", default="site", help="the folder to write (default: site)")
    parser.add_argument("--diff-table", action="store_true",
                        help="only print the Markdown table of the diffs' sizes (lines and tokens) "
                             "that the README holds")
    args = parser.parse_args(argv)
    if args.diff_table:
        print(diff_table(diff_sizes(read_sources())))
        return
    out = build(args.out)
    print(f"{len(list(out.glob('*.html')))} pages written to {out}; open {out / 'index.html'}")


if __name__ == "__main__":
    run(main, prog="python -m shared.site")
