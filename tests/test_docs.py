"""The documentation holds: every Markdown link and every file reference in the repository
points at something that exists, the README's five-minute tour runs as written, and
`python -m megatron_infini` is the `megatron-infini` console script."""

import os
import re
import subprocess
import sys

from train_utils import REPO, readme_tour, run_cli

# Top-level directories a file reference starts with (`tools/demo.sh`, docs/infini.md, ...).
TOP_DIRS = ("megatron_infini", "tools", "configs", "launch", "slurm", "tests", "docs")
TEXT_SUFFIXES = (".md", ".py", ".yaml", ".sh", ".toml")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./-])((?:%s)/[\w./-]*[\w])" % "|".join(TOP_DIRS))
BACKTICKED_MD = re.compile(r"`([\w.-]+\.md)`")


def tracked_files():
    out = subprocess.run(["git", "ls-files"], cwd=REPO, stdout=subprocess.PIPE, text=True, check=True).stdout
    return [f for f in out.splitlines() if f.endswith(TEXT_SUFFIXES) and os.path.isfile(os.path.join(REPO, f))]


def github_anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(md_path: str) -> set:
    with open(md_path, encoding="utf-8") as fh:
        return {github_anchor(m.group(1)) for m in re.finditer(r"^#+\s+(.*)$", fh.read(), re.M)}


def references(rel: str, text: str):
    """(what was written, the path it must resolve to, anchor or None) for one file's text."""
    here = os.path.dirname(os.path.join(REPO, rel))
    if rel.endswith(".md"):
        for m in LINK.finditer(text):
            target = m.group(1)
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            yield target, os.path.normpath(os.path.join(here, path)) if path else os.path.join(REPO, rel), anchor or None
        for m in BACKTICKED_MD.finditer(text):  # `README.md`: beside the page or at the root
            if not os.path.exists(os.path.join(here, m.group(1))):
                yield m.group(1), os.path.join(REPO, m.group(1)), None
    for m in PATH.finditer(text):
        path = m.group(1).rstrip(".")
        if text[m.end():m.end() + 1] in ("$", "{", "*") or re.search(r"/[A-Z_]+$", path):  # globs, placeholders
            continue
        path, _, anchor = path.partition("#")
        full = os.path.join(REPO, path)
        if not os.path.exists(full) and _is_prefix(full):
            continue  # a prefix of existing files (--output-prefix .../tokenizer -> tokenizer.model)
        yield m.group(1), full, anchor or None


def _is_prefix(path: str) -> bool:
    folder, name = os.path.split(path)
    return os.path.isdir(folder) and any(f.startswith(name + ".") for f in os.listdir(folder))


def test_markdown_links_and_file_references_exist():
    checked, broken = 0, []
    for rel in tracked_files():
        with open(os.path.join(REPO, rel), encoding="utf-8") as fh:
            text = fh.read()
        for written, path, anchor in references(rel, text):
            checked += 1
            if not os.path.exists(path):
                broken.append(f"{rel}: {written} -> {os.path.relpath(path, REPO)} does not exist")
            elif anchor and path.endswith(".md") and anchor not in anchors(path):
                broken.append(f"{rel}: {written}: no heading with anchor #{anchor}")
    assert not broken, "\n".join(broken)
    assert checked > 100  # the scan found the references (README, docs, code comments)


def test_no_reference_to_notes_outside_the_repository():
    for rel in tracked_files():
        with open(os.path.join(REPO, rel), encoding="utf-8") as fh:
            text = fh.read()
        # spelled in pieces so that this file does not mention them itself
        for name in (f"{n}.md" for n in ("INFINI", "CPU-NOTES", "STYLE")):
            assert name not in text, f"{rel} mentions {name}"
        for name in ("../shared", "/work/shared"):
            assert name not in text or rel == "tests/test_docs.py", f"{rel} mentions {name}"


def test_python_dash_m_is_the_console_script():
    from megatron_infini.cli import _usage

    env = dict(os.environ, PYTHONWARNINGS="ignore")
    p = subprocess.run([sys.executable, "-m", "megatron_infini", "--help"], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip() == _usage().strip()
    p = subprocess.run([sys.executable, "-m", "megatron_infini", "no-such-command"], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 2 and "unknown command 'no-such-command'" in p.stderr
    p = subprocess.run([sys.executable, "-m", "megatron_infini", "eval", "--help"], cwd=REPO, env=env,
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == 0 and "perplexity" in p.stdout  # arguments reach the subcommand


def test_readme_tour_runs_as_written(debug_run):
    """Step 1 is the session's `debug_run` (tests/conftest.py runs it from the README); steps 2
    and 3 run here on it, with runs/tour replaced by its directory."""
    tour = readme_tour()
    assert len(tour) == 3 and "run_dir=runs/tour" in tour[0]
    outputs = []
    for cmd in tour[1:]:
        assert cmd[0] == "megatron-infini", cmd
        outputs.append(run_cli(*[debug_run if a == "runs/tour" else a for a in cmd[1:]]))
    generated, perplexity = outputs
    assert "[generate] checkpoint=" in generated and "prompt_tokens=" in generated
    assert "ppl mem off" in perplexity
