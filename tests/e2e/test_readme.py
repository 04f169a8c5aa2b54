"""README.md and docs/ as a newcomer follows them: every command is
extracted and checked as written, in a clean copy of the checkout with the project's
``.venv`` activated the way the README says.

* the cheap commands (``--help``, ``--cfg job``) and every ```python block run as written;
* every command of a Hydra app (also through torchrun, srun, the launch and sweep scripts)
  composes and passes the app's config check, every swept value of a sweep;
* every other entry point (``python -m scripts.X``, ``python scripts/X.py``, shell scripts)
  exists and answers ``--help``; the fairseq command lines parse with fairseq's parser;
* the smoke table is the one ``results/smoke/`` gives, and no page quotes smoke numbers of
  its own.

docs/speed.md and the README's speed section are checked by the benchmark's own tests
(tests/unit/test_benchmark_measures.py, tests/e2e/test_benchmark_app.py).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments.core.io import REPO_ROOT
from tests.composition import compose

APPS = ("vision", "language_model", "translation", "mechanism", "benchmark")  # the promised apps

PAGES = ["README.md", *sorted(f"docs/{p.name}" for p in (REPO_ROOT / "docs").glob("*.md"))]
PAGES = [p for p in PAGES if p != "docs/speed.md"]
PROGRAMS = ("python ", ".venv/bin/python ", "torchrun ", "make ", "fairseq-", "srun ", "sbatch ",
            "source ")  # fmt: skip
# Inline code in prose is a command when it starts like one (not a bare program name).
INLINE = ("python ", ".venv/bin/python ", "make ")
# Shell words that mark a command as a template to fill in, not one to run as written.
PLACEHOLDER = re.compile(r"^\[|\]$|<[^>]*>|\.\.\.|^[A-Z_]+(\.\.\.)?$|=[A-Z_]+$|ENTITY/PROJECT")


def page_text(page: str) -> str:
    text = (REPO_ROOT / page).read_text()
    if page == "README.md":  # the speed section is checked by the benchmark's tests
        start = text.index("\n## Speed\n")
        text = text[:start] + text[text.index("\n## ", start + 1) :]
    return text


def code_blocks(page: str) -> list[tuple[str, str]]:
    return re.findall(r"^```(\w*)\n(.*?)^```", page_text(page), re.S | re.M)


def python_blocks(page: str) -> list[str]:
    return [body for lang, body in code_blocks(page) if lang == "python"]


def _is_script(word: str) -> bool:
    return word.startswith("scripts/") and word.endswith(".sh")


@dataclass(frozen=True)
class Command:
    page: str
    words: tuple[str, ...]
    env: tuple[tuple[str, str], ...] = ()

    @property
    def text(self) -> str:
        return shlex.join(self.words)


def commands(page: str) -> list[Command]:
    """Every shell command of a page: lines of its shell / plain code blocks and inline code
    spans that start with a program (continuations joined, ``&&`` split, comments dropped,
    variables set on a line of their own expanded)."""
    found = []
    chunks = [body for lang, body in code_blocks(page) if lang in ("", "bash", "sh")]
    prose = re.sub(r"^```.*?^```", "", page_text(page), flags=re.S | re.M)
    chunks += [m for m in re.findall(r"`([^`\n]+)`", prose) if m.startswith(INLINE)]
    for chunk in chunks:
        variables: dict[str, str] = {}
        for line in re.sub(r"\\\n\s*", " ", chunk).splitlines():
            for part in line.split("&&"):
                try:
                    words = shlex.split(part, comments=True)
                except ValueError:
                    continue
                env = []
                while words and re.fullmatch(r"[A-Z_]+=.*", words[0]):
                    name, _, value = words.pop(0).partition("=")
                    env.append((name, value))
                if not words:
                    variables.update(env)
                    continue
                if not (f"{words[0]} ".startswith(PROGRAMS) or _is_script(words[0])):
                    continue
                expanded: list[str] = []
                for w in words:
                    if w.startswith("$") and w[1:] in variables:
                        expanded += shlex.split(variables[w[1:]])
                    else:
                        expanded.append(w)
                found.append(Command(page, tuple(expanded), tuple(env)))
    return found


ALL = [c for page in PAGES for c in commands(page)]


def _after_wrapper(words: tuple[str, ...]) -> tuple[str, ...]:
    """The command inside ``srun OPTIONS CMD`` / ``sbatch OPTIONS CMD``."""
    if words and words[0] in ("srun", "sbatch"):
        starts = ("python", ".venv/bin/python", "scripts/")
        inner = next((i for i, w in enumerate(words) if i and w.startswith(starts)), None)
        return words[inner:] if inner is not None else ()
    return words


def app_invocation(command: Command) -> tuple[str, list[str]] | None:
    """(app, its arguments) when the command runs one of the Hydra apps."""
    words = _after_wrapper(command.words)
    if not words:
        return None
    if words[0] in ("python", ".venv/bin/python", "torchrun") and "-m" in words:
        modules = [words[i + 1] for i, w in enumerate(words[:-1]) if w == "-m"]
        module = next((m for m in modules if m.startswith("experiments.")), "")
        app = module.removeprefix("experiments.")
        if app in APPS:
            return app, list(words[words.index(module) + 1 :])
    if words[0] == "scripts/launch_vision.sh":
        rest = list(words[2:])
        return "vision", rest[1:] if rest and rest[0].isdigit() else rest
    if words[0] == "scripts/launch_fairseq.sh" and len(words) > 1 and words[1] in APPS:
        return words[1], list(words[2:])
    return None


def is_template(words) -> bool:
    return any(PLACEHOLDER.search(w) for w in words)


# --- a clean checkout with .venv, as after `make setup` -------------------------------------


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Path:
    """The tracked (and new, unignored) files of this checkout in a fresh folder, with
    ``.venv`` being the environment that runs the tests (what ``make setup`` made)."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=REPO_ROOT, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    root = tmp_path_factory.mktemp("clean") / "multimax"
    for name in filter(None, files):
        source = REPO_ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / ".venv").symlink_to(Path(sys.prefix))
    return root


def shell(checkout: Path, command: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``command`` in a new login-free shell at the checkout's root, after the README's
    ``source .venv/bin/activate``; no PYTHONPATH, no other environment of the test run."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(checkout.parent), "LANG": "C.UTF-8",
           "WANDB_MODE": "offline", "TMPDIR": os.environ.get("TMPDIR", "/tmp")}  # fmt: skip
    return subprocess.run(
        ["bash", "-c", f"source .venv/bin/activate && {command}"],
        cwd=checkout, env=env, input=stdin, capture_output=True, text=True,
    )  # fmt: skip


def _written(checkout: Path) -> list[str]:
    return sorted(p.name for p in checkout.iterdir() if p.name in ("runs", "outputs", "multirun"))


# --- point 1: the README's commands, as written ------------------------------------------------


def test_readme_says_how_to_get_the_projects_python():
    readme = page_text("README.md")
    assert "make setup" in readme and "source .venv/bin/activate" in readme
    assert re.search(r"^setup:", (REPO_ROOT / "Makefile").read_text(), re.M)


def test_the_cheap_commands_run_as_written_in_a_clean_checkout(checkout):
    cheap = [c for c in ALL if "--help" in c.words or "--cfg" in c.words]
    assert any(c.page == "README.md" and "--help" in c.words for c in cheap)
    assert any(c.page == "README.md" and "--cfg" in c.words for c in cheap)
    for command in cheap:
        proc = shell(checkout, command.text)
        assert proc.returncode == 0, f"{command.page}: {command.text}\n{proc.stderr[-2000:]}"
        assert "Traceback" not in proc.stderr
    assert _written(checkout) == []  # looking around writes no run


# --- point 2: the Python blocks, as written -----------------------------------------------------


@pytest.mark.parametrize("page", [p for p in PAGES if python_blocks(p)])
def test_every_python_block_runs_as_written(page, checkout):
    for block in python_blocks(page):
        proc = shell(checkout, "python -", stdin=block)
        assert proc.returncode == 0, f"{page}:\n{block}\n{proc.stderr[-3000:]}"


# --- every other command: accepted as written ----------------------------------------------------


def _points(args: list[str]) -> list[list[str]]:
    from experiments.config import check as config_check

    overrides = [a for a in args if not a.startswith("-") and not is_template([a])]
    if "-m" in args or "--multirun" in args:
        return config_check.sweep_samples(overrides)  # every swept value once
    return [overrides]


def test_every_app_command_composes_and_passes_the_config_check():
    """Each Hydra app command of the README and docs (directly, under torchrun / srun, or
    through the launch scripts), every point of a sweep."""
    from experiments.config import check as config_check

    checked = 0
    for command in ALL:
        found = app_invocation(command)
        if found is None or "--help" in command.words or "--cfg" in command.words:
            continue
        app, args = found
        for point in _points(args):
            cfg = compose(app, point, hydra=True)
            problems = config_check.problems(cfg, app, cfg.hydra.runtime.choices)
            assert problems == [], f"{command.page}: {command.text}\n{problems}"
            checked += 1
    assert checked >= 20


def test_every_sweep_script_command_passes_the_config_check(checkout):
    """``scripts/sweep.sh TABLE OVERRIDES``: the multirun it starts (``DRY=1`` prints it)."""
    from experiments.config import check as config_check

    sweeps = [c for c in ALL if c.words[0] == "scripts/sweep.sh" and not is_template(c.words)]
    assert sweeps
    for command in sweeps:
        env = " ".join(f"{k}={shlex.quote(v)}" for k, v in command.env)
        proc = shell(checkout, f"{env} DRY=1 {command.text}")
        assert proc.returncode == 0, f"{command.page}: {command.text}\n{proc.stderr}"
        words = shlex.split(proc.stdout.splitlines()[0].removeprefix("+ "))
        app = words[words.index("-m") + 1].removeprefix("experiments.")
        for point in _points(words[words.index("-m") + 2 :]):
            cfg = compose(app, point, hydra=True)
            assert config_check.problems(cfg, app, cfg.hydra.runtime.choices) == [], point


def _entry_point(command: Command) -> str | None:
    """``-m scripts.X`` / ``scripts/X.py`` / ``-m experiments.analyze``: what to ask --help."""
    words = _after_wrapper(command.words)
    if words[0] in ("python", ".venv/bin/python") and len(words) > 1:
        if words[1] == "-m" and len(words) > 2 and words[2] not in ("pytest",):
            module = words[2]
            return None if module.removeprefix("experiments.") in APPS else module
        if words[1].endswith(".py"):
            return words[1]
    return None


def test_every_script_and_module_answers_help_in_a_clean_checkout(checkout):
    entries = sorted({e for c in ALL if (e := _entry_point(c))})
    assert "scripts/make_tables.py" in entries and "scripts.demo" in entries
    for entry in entries:
        launch = f"python {entry}" if entry.endswith(".py") else f"python -m {entry}"
        proc = shell(checkout, f"{launch} --help")
        assert proc.returncode == 0 and "usage" in proc.stdout.lower(), (entry, proc.stderr)
    scripts = sorted({c.words[0] for c in ALL if c.words[0].startswith("scripts/")} |
                     {w for c in ALL for w in c.words if w.startswith("scripts/launch_")})  # fmt: skip
    for script in scripts:
        path = checkout / script
        assert path.is_file() and os.access(path, os.X_OK), script
        assert shell(checkout, f"bash -n {script}").returncode == 0, script


def test_every_make_target_exists():
    targets = set(re.findall(r"^([\w-]+):", (REPO_ROOT / "Makefile").read_text(), re.M))
    for command in ALL:
        if command.words[0] == "make":
            assert set(command.words[1:]) <= targets, command.text


def test_the_plugins_fairseq_command_lines_parse_as_written():
    """docs/fairseq_plugin.md: fairseq-train / -generate / -eval-lm with our --user-dir,
    parsed by fairseq's own parsers (paths need not exist)."""
    from experiments.pipelines.fairseq import commands as fairseq_commands

    lines = [
        (c.words[0], [w for w in c.words[1:]])
        for c in ALL
        if c.words[0].startswith("fairseq-") and not is_template(c.words)
    ]
    assert {program for program, _ in lines} >= {"fairseq-train", "fairseq-generate"}
    found = fairseq_commands.parse_with_fairseq(lines)
    assert [(p, e) for p, e in found if e] == []


# --- point 3: the smoke numbers come from results/smoke -------------------------------------------


def test_the_smoke_table_is_the_one_results_smoke_gives():
    from experiments.pipelines import demo

    table = demo.smoke_table(REPO_ROOT / "results" / "smoke")
    assert "| softmax | multimax |" in table and "make demo` made these" in table
    for name in demo.SMOKE_TABLE_FILES:
        text = (REPO_ROOT / name).read_text()
        assert demo.SMOKE_BEGIN in text, f"{name} has no smoke table written by make demo"
        assert demo.with_smoke_table(text, table) == text, f"{name}: run python -m scripts.demo"


def test_no_page_quotes_smoke_numbers_of_its_own():
    """Outside the written tables no page repeats a smoke result (it would go stale)."""
    import csv

    from experiments.pipelines import demo
    from experiments.pipelines.report.render import fmt_value as _fmt

    numbers = set()
    for path in (REPO_ROOT / "results" / "smoke").glob("*_smoke.csv"):
        with path.open() as f:
            for row in csv.DictReader(f):
                numbers.add(_fmt(float(row["mean"])))  # as the tables show it
    for page in PAGES:
        text = page_text(page)
        if demo.SMOKE_BEGIN in text:
            start, end = text.index(demo.SMOKE_BEGIN), text.index(demo.SMOKE_END)
            text = text[:start] + text[end:]
        quoted = {n for n in numbers if re.search(rf"(?<![\d.]){re.escape(n)}(?![\d])", text)}
        assert quoted == set(), f"{page} quotes smoke numbers {sorted(quoted)}"


def test_the_smoke_table_follows_the_results(tmp_path):
    """The table is made from results/smoke's files: change a result, the table changes."""
    from experiments.pipelines import demo

    results = tmp_path / "smoke"
    shutil.copytree(REPO_ROOT / "results" / "smoke", results)
    csv_file = results / "imagenet_top1_smoke.csv"
    rows = csv_file.read_text().splitlines()
    head, multimax = rows[0].split(","), next(r for r in rows if ",multimax,multimax," in r)
    cells = multimax.split(",")
    cells[head.index("mean")] = "12.5"
    csv_file.write_text("\n".join(r if r != multimax else ",".join(cells) for r in rows) + "\n")
    table = demo.smoke_table(results)
    assert "| 12.50 |" in table
    text = (REPO_ROOT / "README.md").read_text()
    assert "| 12.50 |" in demo.with_smoke_table(text, table)
