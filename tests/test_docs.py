"""Every link in every Markdown file of the project resolves, and every link to code points at
the line that holds what the link names.

Rules (what a learner clicking through a README may count on):
- a relative link names a file or directory that exists;
- a link to a `.py` file carries a line anchor, `model.py#L123`, and when its text names a
  function, class or constant (`Llama.generate`, `` `RMSNorm` ``, `test_rope_...`), that line
  defines it (`def`, `class` or an assignment); a link whose text is a file name points at the
  file's first line;
- a link to a heading (`README.md#results`, `#fast-on-a-cpu`) finds that heading, spelled as
  GitHub spells anchors.

Line numbers move when code changes: `python tests/test_docs.py --fix` rewrites every code
link's anchor to the line that now defines what it names (and fails on names it cannot find).
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SKIP_DIRS = {".venv", ".git", "build", "runs", ".pytest_cache", "node_modules"}
LINK = re.compile(r"(?<!!)\[([^\]]+)\]\(([^)\s]+)\)")  # [text](target), not images
IMAGE = re.compile(r"!\[[^\]]*\]\(([^)\s]+)\)")
IDENTIFIER = re.compile(r"([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*)(?:\(\))?$")


def markdown_files() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.md") if not SKIP_DIRS & set(p.relative_to(ROOT).parts))


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(markdown: Path) -> set[str]:
    found, in_code = set(), False
    counts: dict[str, int] = {}
    for line in markdown.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_code = not in_code
        if not in_code and re.match(r"#{1,6} ", line):
            base = slug(line.lstrip("#"))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def named(text: str, target: Path | None = None) -> str | None:
    """What a link's text names: `Llama.generate` → "Llama.generate"; `save_pretrained(dir)` →
    "save_pretrained"; `fast.accelerate(model)` in a link to fast.py → "accelerate";
    `fromscratch.llama.train` → "train"; `model.py`, `fromscratch.blocks`, prose → None."""
    text = text.strip().strip("`").strip()
    if text.endswith(".py") or "/" in text:
        return None
    text = text.split(":")[-1].strip().strip("`").strip()  # "model.py: sinusoidal_positions"
    text = re.sub(r"\(.*\)$", "", text)  # a call's arguments
    match = IDENTIFIER.fullmatch(text)
    if not match:
        return None
    parts = match.group(1).split(".")
    if target is not None:
        modules = {target.stem, target.parent.name, "fromscratch"}
        while parts and parts[0] in modules | {"fromscratch", "llama", "transformer", "moe", "vlm", "blocks",
                                                "fast", "engine", "checkpoints"}:
            parts = parts[1:]
    return ".".join(parts) or None


def definition_line(path: Path, name: str) -> int | None:
    """1-based line that defines `name` ("Class.method" looks inside the class) in `path`."""
    lines = path.read_text(encoding="utf-8").splitlines()
    *outer, last = name.split(".")
    start = 0
    if outer:  # the innermost enclosing class or function named before the dot
        found = definition_line(path, outer[-1]) if len(outer) == 1 else definition_line(path, ".".join(outer))
        if found is None:
            return None
        start = found  # search below it
    pattern = re.compile(rf"^\s*(?:async\s+)?(?:def|class)\s+{re.escape(last)}\b|^\s*{re.escape(last)}\s*(?::[^=]*)?=")
    for number in range(start, len(lines)):
        if pattern.match(lines[number]):
            return number + 1
    return None


def check_links(markdown: Path) -> list[str]:
    problems = []
    text = markdown.read_text(encoding="utf-8")
    for target in IMAGE.findall(text):
        if not re.match(r"[a-z]+://", target) and not (markdown.parent / target.split("#")[0]).exists():
            problems.append(f"{markdown.relative_to(ROOT)}: image {target} does not exist")
    for link_text, target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s)://, mailto:
            continue
        where = f"{markdown.relative_to(ROOT)}: [{link_text}]({target})"
        path_part, _, anchor = target.partition("#")
        path = (markdown.parent / path_part).resolve() if path_part else markdown
        if not path.exists():
            problems.append(f"{where}: {path_part} does not exist")
            continue
        if path.suffix == ".py":
            if not re.fullmatch(r"L\d+", anchor):
                problems.append(f"{where}: a link to code needs a line anchor (#L123)")
                continue
            line = int(anchor[1:])
            n_lines = len(path.read_text(encoding="utf-8").splitlines())
            if line > max(n_lines, 1):
                problems.append(f"{where}: {path.name} has only {n_lines} lines")
                continue
            name = named(link_text, path)
            if name is None:
                if line != 1 and link_text.strip("`").endswith(".py"):
                    problems.append(f"{where}: a link to a file points at its first line (#L1)")
                continue
            expected = definition_line(path, name)
            if expected is None:
                problems.append(f"{where}: {path.name} defines no {name}")
            elif expected != line:
                problems.append(f"{where}: {name} is defined at line {expected}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            problems.append(f"{where}: {path.name} has no heading #{anchor}")
    return problems


def fix_links(markdown: Path) -> list[str]:
    """Rewrite code links' line anchors to where their names are defined now; the problems left."""
    unfixable = []

    def replace(match: re.Match) -> str:
        link_text, target = match.group(1), match.group(2)
        path_part, _, anchor = target.partition("#")
        path = (markdown.parent / path_part).resolve()
        if re.match(r"[a-z]+:", target) or path.suffix != ".py" or not path.exists():
            return match.group(0)
        name = named(link_text, path)
        line = 1 if name is None else definition_line(path, name)
        if line is None:
            unfixable.append(f"{markdown.relative_to(ROOT)}: [{link_text}]({target}): {path.name} defines no {name}")
            return match.group(0)
        return f"[{link_text}]({path_part}#L{line})"

    text = markdown.read_text(encoding="utf-8")
    markdown.write_text(LINK.sub(replace, text), encoding="utf-8")
    return unfixable


def test_every_link_and_anchor_in_every_markdown_file_resolves():
    files = markdown_files()
    assert len(files) >= 4  # the root README, the model READMEs, docs/
    problems = [problem for markdown in files for problem in check_links(markdown)]
    assert not problems, "\n".join(problems) + "\n(run `python tests/test_docs.py --fix` for line anchors)"


def test_the_checker_finds_what_it_should(tmp_path):
    code = tmp_path / "m.py"
    code.write_text('"""Doc."""\n\nLIMIT = 3\n\n\nclass A:\n    def run(self):\n        pass\n\n\ndef run():\n    pass\n')
    assert definition_line(code, "A.run") == 7 and definition_line(code, "run") == 7  # first definition
    assert definition_line(code, "LIMIT") == 3 and definition_line(code, "B") is None
    assert named("`Llama.generate`") == "Llama.generate" and named("model.py") is None
    assert named("model.py: sinusoidal_positions") == "sinusoidal_positions" and named("the tested code") is None
    assert named("`save_pretrained(dir)`") == "save_pretrained"
    assert named("`fast.accelerate(model)`", Path("llama/fast.py")) == "accelerate"
    assert named("`fromscratch.blocks`", Path("blocks/__init__.py")) is None
    assert slug("§3.2.1 Scaled dot-product attention") == "321-scaled-dot-product-attention"
    assert slug("Fast on a CPU") == "fast-on-a-cpu"


if __name__ == "__main__":
    if sys.argv[1:] == ["--fix"]:
        left = [problem for markdown in markdown_files() for problem in fix_links(markdown)]
        left += [problem for markdown in markdown_files() for problem in check_links(markdown)]
        print("\n".join(left) or "every link resolves")
        sys.exit(1 if left else 0)
    print(__doc__)
