"""The docs' links hold: every relative link and #anchor in README.md, docs/*.md and data/*/README.md points to a
file that exists and, with an anchor, to a heading of that file, slugged as GitHub slugs headings. Links inside
code blocks and code spans are text, not links; web addresses are not checked (no network)."""
import glob
import os
import re

from conftest import REPO

LINK = re.compile(r'!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]*)>?(?:\s+"[^"]*")?\s*\)')  # [text](target "title")
REFERENCE = re.compile(r'^\s{0,3}\[[^\]]+\]:\s*<?(\S+?)>?(?:\s+.*)?$')                   # [label]: target
HEADING = re.compile(r'^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$')
FENCE = re.compile(r'^\s{0,3}(```|~~~)')


def doc_files(root=REPO):
    return sorted([os.path.join(root, 'README.md'), *glob.glob(os.path.join(root, 'docs', '*.md')),
                   *glob.glob(os.path.join(root, 'data', '*', 'README.md'))])


def prose_lines(text, blank_code=True):
    """The lines outside fenced code blocks, with inline code spans blanked out (blank_code): (number, line)."""
    fence = None
    for number, line in enumerate(text.split('\n'), 1):
        m = FENCE.match(line)
        if m and (fence is None or m.group(1) == fence):
            fence = m.group(1) if fence is None else None
            continue
        if fence is None and not blank_code:
            yield number, line
        elif fence is None:
            yield number, re.sub(r'(`+).+?\1', lambda s: ' ' * len(s.group(0)), line)


def github_slug(heading):
    """GitHub's anchor for a heading: the rendered text (links and images as their text, markup dropped),
    lowercased, every character but letters, digits, '_', '-' and spaces removed, spaces turned into '-'."""
    text = re.sub(r'!?\[([^\]]*)\]\([^)]*\)', r'\1', heading)  # [text](url) -> text
    text = re.sub(r'<[^>]+>', '', text)                          # inline HTML tags
    text = re.sub(r'[^\w\- ]', '', text.lower())                 # \w: unicode letters, digits and '_'
    return text.replace(' ', '-')


def anchors(path):
    """Every anchor a markdown file's headings define; a repeated heading gets -1, -2, ... as on GitHub."""
    seen, found = {}, set()
    with open(path, encoding='utf-8') as f:
        for _, line in prose_lines(f.read(), blank_code=False):
            m = HEADING.match(line)
            if not m:
                continue
            slug = github_slug(m.group(2).replace('`', ''))
            found.add(slug if slug not in seen else f'{slug}-{seen[slug]}')
            seen[slug] = seen.get(slug, 0) + 1
    return found


def broken_links(path):
    """[(line number, target, why)] for each relative link of the markdown file at path that does not resolve."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    code_free = {n: line for n, line in prose_lines(text)}
    broken = []
    for number, line in code_free.items():
        targets = [m.group(1) for m in LINK.finditer(line)]
        m = REFERENCE.match(line)
        targets += [m.group(1)] if m else []
        for target in targets:
            if not target or re.match(r'^[a-z][a-z0-9+.-]*:', target, re.I):  # http:, https:, mailto:, ...
                continue
            file_part, _, anchor = target.partition('#')
            resolved = os.path.normpath(os.path.join(os.path.dirname(path), file_part)) if file_part else path
            if not os.path.exists(resolved):
                broken.append((number, target, 'no such file'))
            elif anchor and (not resolved.endswith('.md') or anchor not in anchors(resolved)):
                broken.append((number, target, f'no heading #{anchor} in {os.path.relpath(resolved, REPO)}'))
    return broken


def test_every_relative_link_and_anchor_in_the_docs_resolves():
    files = doc_files()
    assert os.path.join(REPO, 'README.md') in files and os.path.join(REPO, 'docs', 'regime-map.md') in files
    assert os.path.join(REPO, 'data', 'shapes', 'README.md') in files
    broken = {os.path.relpath(f, REPO): b for f in files if (b := broken_links(f))}
    assert broken == {}


def test_every_docs_page_is_reachable_from_the_readme():
    """Each page under docs/ is linked from README.md (the Results table or a section), so none is orphaned."""
    with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
        readme = f.read()
    linked = {os.path.normpath(os.path.join(REPO, m.group(1).partition('#')[0])) for m in LINK.finditer(readme)}
    pages = {os.path.normpath(p) for p in glob.glob(os.path.join(REPO, 'docs', '*.md'))}
    assert pages - linked == set()


def test_github_slugs():
    """The slugs GitHub gives headings of the kinds these docs use (punctuation dropped, code spans kept as text,
    each space a hyphen, so ' / ' becomes '--')."""
    assert github_slug('Where does ARRA help? The regime map on shapes') == \
        'where-does-arra-help-the-regime-map-on-shapes'
    assert github_slug('Sharded training (FSDP), and what a run at scale costs') == \
        'sharded-training-fsdp-and-what-a-run-at-scale-costs'
    assert github_slug("The `plan` world (plan_world.py, --world=plan)".replace('`', '')) == \
        'the-plan-world-plan_worldpy---worldplan'
    assert github_slug('Speed / memory: [bench](bench.py)') == 'speed--memory-bench'


def test_the_check_fails_on_a_dangling_link_or_anchor(tmp_path):
    """A page with a missing file, a missing heading and a link into a code block: the first two are reported,
    the good links and the code are not."""
    (tmp_path / 'other.md').write_text('# Other page\n\n## A section, with `code`\n\n## A section, with code\n')
    page = tmp_path / 'page.md'
    page.write_text('\n'.join([
        '# Title', '',
        'Good: [other](other.md), [its section](other.md#a-section-with-code), the repeat '
        '[again](other.md#a-section-with-code-1), [here](#title), [web](https://example.com/x.md).',
        'Bad: [gone](missing.md) and [no heading](other.md#no-such-section) and [self](#nowhere).',
        '[ref]: also-missing.md', '',
        '```bash', 'echo "[not a link](nowhere.md)"', '```',
        'Inline `[not a link](nowhere.md)` either.', '']))
    other = os.path.relpath(tmp_path / 'other.md', REPO)
    assert broken_links(str(page)) == [
        (4, 'missing.md', 'no such file'),
        (4, 'other.md#no-such-section', f'no heading #no-such-section in {other}'),
        (4, '#nowhere', f'no heading #nowhere in {os.path.relpath(page, REPO)}'),
        (5, 'also-missing.md', 'no such file')]
    page.write_text('# Title\n\n[other](other.md#other-page) and [here](#title)\n')
    assert broken_links(str(page)) == []
