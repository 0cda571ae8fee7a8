"""The documentation's links hold: in README.md and every Markdown page under docs/, each relative link or image
(`[text](path)`, `[text](path#anchor)`, `![alt](path)`, `[text][ref]` with `[ref]: path`) points at a file or
directory that exists in the repository, and each `#anchor` (in-page or into another .md file) names a heading of
that file under GitHub's slug rule. Web links (http, https, mailto, any other scheme) are not checked. README.md,
the front door, stays short.

GitHub's slug rule (github-slugger): the heading's rendered text, lowercased; every character that is not a
letter, digit, underscore, hyphen or space removed; each space replaced by a hyphen; a repeated slug gets -1, -2,
... in order of appearance. Headings inside fenced code blocks are not headings, and links inside code are not
links.
"""
import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
README_MAX_LINES = 220

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_ATX = re.compile(r"^ {0,3}(#{1,6})(?:[ \t]+(.*?))?[ \t]*$")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1", re.S)
# [text](target) and ![alt](target); text may hold one level of nested brackets; the target is <...> or a run
# without spaces, optionally followed by a "title".
_INLINE_LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\[\]]*\])*\]\(\s*(<[^>]*>|[^\s()]*(?:\([^\s()]*\)[^\s()]*)*)"
                          r"(?:\s+(?:\"[^\"]*\"|'[^']*'|\([^)]*\)))?\s*\)")
_REF_USE = re.compile(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\[([^\]]*)\]")
_REF_DEF = re.compile(r"^ {0,3}\[([^\]]+)\]:\s*(<[^>]*>|\S+)")
_HTML_ID = re.compile(r"<a\s[^>]*\b(?:name|id)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")


def github_slug(text):
    """The anchor GitHub gives a heading whose source text is ``text`` (before de-duplication)."""
    text = re.sub(r"!?\[((?:[^\[\]]|\[[^\[\]]*\])*)\]\([^)]*\)", r"\1", text)  # links and images -> their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML tags
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w: letters, digits, underscore (Unicode-aware, as GitHub)
    return text.replace(" ", "-")


def _lines_outside_fences(markdown):
    """(line number, line) for each line not inside a fenced code block (fence lines themselves excluded)."""
    fence = None
    for number, line in enumerate(markdown.splitlines(), 1):
        m = _FENCE.match(line)
        if fence is None:
            if m:
                fence = m.group(1)
                continue
            yield number, line
        elif m and m.group(1)[0] == fence[0] and len(m.group(1)) >= len(fence) and not line.strip()[len(m.group(1)):]:
            fence = None


def heading_anchors(markdown):
    """Every anchor a GitHub-rendered page has: heading slugs (duplicates numbered) and explicit HTML ids."""
    anchors, seen = set(), {}
    previous = ""
    for _, line in _lines_outside_fences(markdown):
        text = None
        atx = _ATX.match(line)
        if atx:
            text = re.sub(r"[ \t]+#+$", "", atx.group(2) or "")  # closing #s
        elif _SETEXT.match(line) and previous.strip() and not previous.lstrip().startswith(("|", "-", "*", ">")) \
                and not _ATX.match(previous):
            text = previous.strip()
        if text is not None:
            slug = github_slug(text)
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
        anchors.update(a for a in _HTML_ID.findall(line))
        previous = line
    return anchors


def iter_links(markdown):
    """(line number, target) of every link and image outside code, reference-style links resolved."""
    lines = list(_lines_outside_fences(markdown))
    definitions = {}
    for _, line in lines:
        m = _REF_DEF.match(line)
        if m:
            definitions[m.group(1).strip().lower()] = m.group(2)
    for number, line in lines:
        if _REF_DEF.match(line):
            yield number, _REF_DEF.match(line).group(2).strip("<>")
            continue
        line = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for m in _INLINE_LINK.finditer(line):
            yield number, m.group(1).strip("<>")
        for m in _REF_USE.finditer(line):
            label = (m.group(2) or m.group(1)).strip().lower()
            if label in definitions:
                continue  # reported with its definition
            yield number, f"[{label}]"  # a reference with no definition: always broken


def check_file(path, root):
    """Problems (one string each) with the relative links of the Markdown file ``path`` inside ``root``."""
    path, root = Path(path).resolve(), Path(root).resolve()
    text = path.read_text(encoding="utf-8")
    where = path.relative_to(root)
    problems = []
    anchor_cache = {}

    def anchors_of(md):
        if md not in anchor_cache:
            anchor_cache[md] = heading_anchors(md.read_text(encoding="utf-8"))
        return anchor_cache[md]

    for number, target in iter_links(text):
        if target.startswith("[") and target.endswith("]"):
            problems.append(f"{where}:{number}: reference {target} has no definition")
            continue
        if not target or _SCHEME.match(target) or target.startswith("//"):
            continue
        file_part, _, anchor = target.partition("#")
        file_part = unquote(file_part.split("?", 1)[0])
        if file_part:
            dest = (root / file_part.lstrip("/")) if file_part.startswith("/") else (path.parent / file_part)
            dest = dest.resolve()
            if root != dest and root not in dest.parents:
                problems.append(f"{where}:{number}: {target} leaves the repository")
                continue
            if not dest.exists():
                problems.append(f"{where}:{number}: {target}: {dest.relative_to(root)} does not exist")
                continue
        else:
            dest = path
        if anchor and dest.is_file() and dest.suffix.lower() == ".md":
            if unquote(anchor).lower() not in anchors_of(dest):
                problems.append(f"{where}:{number}: {target}: no heading with anchor #{anchor} in "
                                f"{dest.relative_to(root)}")
    return problems


def doc_files(root=ROOT):
    root = Path(root)
    return [root / "README.md"] + sorted((root / "docs").rglob("*.md"))


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    problems = check_file(path, ROOT)
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_readme_is_short():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; keep it <= {README_MAX_LINES} " \
                                           "and move detail into docs/"


def test_docs_index_lists_every_page():
    index = (ROOT / "docs" / "README.md").read_text(encoding="utf-8")
    listed = {target.partition("#")[0] for _, target in iter_links(index)}
    missing = [p.name for p in sorted((ROOT / "docs").glob("*.md")) if p.name != "README.md" and p.name not in listed]
    assert not missing, f"docs/README.md does not link {missing}"


# ---- the checker itself must be able to fail ----
def test_github_slug():
    assert github_slug("Sampling: ddpm_fast.sample") == "sampling-ddpm_fastsample"
    assert github_slug("The CLI: `ddpm-fast sample`") == "the-cli-ddpm-fast-sample"
    assert github_slug("Fused GroupNorm+SiLU") == "fused-groupnormsilu"
    assert github_slug("Several processes / GPUs") == "several-processes--gpus"
    assert github_slug("Datasets (no network)") == "datasets-no-network"
    assert github_slug("See [the docs](docs/README.md) **now**") == "see-the-docs-now"
    assert heading_anchors("# A\n## A\n### A\n") == {"a", "a-1", "a-2"}
    assert heading_anchors("```bash\n# not a heading\n```\n# Real\n") == {"real"}
    assert heading_anchors("Title\n=====\n\nSub\n---\n") == {"title", "sub"}


def test_checker_finds_broken_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "page.md").write_text("# Page\n\n## Two words\n\n## Two words\n", encoding="utf-8")
    (tmp_path / "pic.png").write_bytes(b"\x89PNG")
    (tmp_path / "README.md").write_text(
        "# Top\n\n## Section: one\n\n"
        "[ok](docs/page.md) [ok](docs/page.md#two-words) [ok](docs/page.md#two-words-1) [ok](#section-one)\n"
        "![ok](pic.png) [ok](docs/) [web](https://example.com/x.md#nowhere) [mail](mailto:a@b.c)\n"
        "`[in code](missing-in-code.md)`\n"
        "```\n[in a fence](missing-in-fence.md)\n```\n"
        "[bad file](docs/missing.md)\n"
        "[bad anchor](docs/page.md#three-words)\n"
        "[bad in-page](#nope)\n"
        "![bad image](missing.png)\n"
        "[bad ref][gone] [ok ref][r]\n\n"
        "[r]: docs/page.md#page\n"
        "[outside](../outside.md)\n",
        encoding="utf-8")
    problems = check_file(tmp_path / "README.md", tmp_path)
    assert len(problems) == 6, problems
    for needle in ("docs/missing.md", "#three-words", "#nope", "missing.png", "[gone]", "../outside.md"):
        assert sum(needle in p for p in problems) == 1, (needle, problems)
    assert check_file(tmp_path / "docs" / "page.md", tmp_path) == []
