"""Every command README.md prints, checked as a user would run it.

The commands come from README.md's shell code blocks (fenced ```bash blocks and indented blocks),
the `code spans` in its prose that start with a command (python, pip, pytest, ...), and the example
overrides in its tables (each run as `python -m pipeline <override>`). A command line is split into
words by shlex as a POSIX shell splits it (quotes removed, `&&` / `|` / `;` separating commands), so
a quoting mistake fails here as it fails in a terminal; a word with an unquoted glob character
(`[`, `*`, `?`) fails too: zsh refuses it ("no matches found") and bash expands it when a file matches.

How each command is checked (CHECKS, first match wins):
- `python -m pipeline ...`: run with `run.dry_run=true` and a temporary `run.output_dir` (it composes
  the config, validates it and prints the memory plan, no weights); exit 0. A sweep (`-m`) for
  SLURM runs its jobs as local dry runs (the launcher's own words dropped: no cluster here) and its
  launcher settings are composed and resolved by Hydra. All of them run through the entry point
  of `python -m pipeline`, one after another in one process (about a minute, not one per command).
- `python -m pipeline.chat / evaluate / report ...`: run on the session's demo run (`outputs/demo`
  in the README), evaluate with `limit=2 max_new_tokens=4` added to keep it short; exit 0.
- `python bench/<name>.py`: `--help` (argument parsing; the benches themselves run for minutes).
- `pip install ...`: the extras it names exist in pyproject.toml, the torch pin is the torch here.
- `pytest -m <marker>`: the marker is registered (the suite runs with --strict-markers).
Paths the README uses as examples (`/runs/a`, `pairs.jsonl`, `/data/hh-rlhf/...`) are replaced
by stand-ins in a temporary folder (PLACEHOLDERS); commands this machine cannot run are in
SKIPPED with the reason. A command found in README.md that no check matches fails the test: a new
command gets a check (or a reason) here.
"""

from __future__ import annotations

import io
import json
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import ROOT

README = ROOT / "README.md"
# First words that make a `code span` in the README's prose a command.
COMMAND_WORDS = ("python", "python3", "pip", "pytest", "printf", "wandb", "torchrun", "deepspeed", "sbatch",
                 "srun", "bash")
SHELL_FENCES = ("bash", "sh", "shell", "console")


@dataclass(frozen=True)
class Snippet:
    """A command line as README.md prints it."""

    line: int   # 1-based line in README.md where it starts
    text: str   # continuation lines joined; for an override, the override alone
    kind: str   # "block" (a code block line), "inline" (a code span in prose), "override" (a table cell)

    @property
    def id(self) -> str:
        return f"L{self.line}:{self.text[:60]}"


def _joined(lines: list[tuple[int, str]]) -> Iterator[tuple[int, str]]:
    """(line number, text) of each command: lines ending in a backslash continue on the next."""
    start, parts = None, []
    for number, text in lines:
        if start is None:
            start = number
        if text.rstrip().endswith("\\"):
            parts.append(text.rstrip()[:-1])
            continue
        parts.append(text)
        command = " ".join(p.strip() for p in parts)
        if command and not command.startswith("#"):
            yield start, command
        start, parts = None, []


def readme_snippets(text: str) -> list[Snippet]:
    """Every command line of a README: shell code blocks (fenced or indented), code spans in prose
    that start with one of COMMAND_WORDS, and the cells of table columns headed "... override"."""
    snippets: list[Snippet] = []
    lines = text.splitlines()
    fence: str | None = None
    block: list[tuple[int, str]] = []
    override_columns: list[int] = []
    previous_blank = True
    for number, line in enumerate(lines, start=1):
        if line.startswith("```"):
            if fence is None:
                fence = line[3:].strip()
            else:
                if fence in SHELL_FENCES:
                    snippets += [Snippet(n, t, "block") for n, t in _joined(block)]
                fence, block = None, []
            continue
        if fence is not None:
            block.append((number, line))
            continue
        if line.startswith("    ") and line.strip() and (previous_blank or block):
            block.append((number, line))  # an indented code block
            continue
        if block:
            snippets += [Snippet(n, t, "block") for n, t in _joined(block)]
            block = []
        previous_blank = not line.strip()
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if any("override" in c for c in cells):
                override_columns = [i for i, c in enumerate(cells) if "override" in c]
            elif not set("".join(cells)) <= set("-: "):
                for i in override_columns:
                    snippets += [Snippet(number, span, "override") for span in re.findall(r"`([^`]+)`", cells[i])]
            continue
        override_columns = []
        for span in re.findall(r"`([^`]+)`", line):
            if span.split()[0] in COMMAND_WORDS:
                snippets.append(Snippet(number, span, "inline"))
    if block:
        snippets += [Snippet(n, t, "block") for n, t in _joined(block)]
    return snippets


@dataclass(frozen=True)
class Command:
    """One command of a command line: its words as the shell passes them, and whether a `|` feeds it."""

    words: tuple[str, ...]
    piped: bool = False

    @property
    def text(self) -> str:
        return " ".join(self.words)


def shell_commands(text: str) -> list[Command]:
    """`text` split as a POSIX shell splits it: one Command per command between `&&`, `||`, `|`
    and `;`, quotes removed, a `#` comment dropped."""
    lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands, words, piped = [], [], False
    for word in [*lexer, ";"]:
        if word in ("&&", "||", "|", ";"):
            if words:
                commands.append(Command(tuple(words), piped))
            words, piped = [], word == "|"
        else:
            words.append(word)
    return commands


def unquoted_globs(text: str) -> list[str]:
    """The words of `text` with a glob character (`[`, `*`, `?`) outside quotes, up to a `#` comment."""
    found, word, quote, glob = [], "", None, False
    for char in text + " ":
        if quote:
            quote = None if char == quote else quote
        elif char == "#" and not word:
            break
        elif char in "'\"":
            quote = char
        elif char.isspace():
            if glob:
                found.append(word)
            word, glob = "", False
            continue
        elif char in "[*?":
            glob = True
        word += char
    return found


SNIPPETS = readme_snippets(README.read_text())
# --------------------------------------------------------------------------- stand-ins and skips

# The README's example paths -> what stands in for them here (a prefix of a word or of a key's value).
PLACEHOLDERS = {
    "outputs/demo": "the session's demo run (tests/conftest.py: demo_run), built only for a command that names it",
    "/runs/": "<tmp>/runs/; a <run>/<stage>/final in it is a tiny random-init OPT with the built-in tokenizer",
    "/data/hh-rlhf/": "the real hh-rlhf files in ../shared/data/hh-rlhf/",
    "pairs.jsonl": "<tmp>/pairs.jsonl, rows with the columns the command's data_blend.fields name",
    "prefs.jsonl": "<tmp>/prefs.jsonl, rows with the columns (and labels) the command's data_blend.fields name",
    "compare.md": "<tmp>/compare.md",
}

# Commands that cannot be checked here, with the reason (their words as the shell passes them, joined by spaces).
SKIPPED = {
    "python3 -m venv .venv": "creates a virtual environment (tests/test_package.py installs the wheel into a fresh one)",
    ". .venv/bin/activate": "a shell builtin that changes the calling shell; nothing a subprocess could check",
    "pytest": "the test suite itself, this test included",
    "wandb sync < run > /wandb/offline-run-*":
        "uploads to wandb's servers (needs network and an account); <run> stands for a run folder",
}
DRY_RUN_DONE = r"^\(dry run: no weights were loaded\)$"


def _demo_rows(fields: dict[str, str]) -> list[dict]:
    """Eight preference rows in the columns `fields` (data_blend.fields.*) names."""
    rows = []
    for i in range(8):
        good, bad = f"the cat is black number {i} .", f"the dog is a fish number {i} ."
        if "answer_a" in fields:
            a_wins, b_wins = fields.get("a_wins", "0"), fields.get("b_wins", "1")
            a_first = i % 2 == 0
            label = a_wins if a_first else b_wins
            rows.append({fields.get("prompt", "prompt"): f"what color is cat {i} ?",
                         fields["answer_a"]: good if a_first else bad, fields["answer_b"]: bad if a_first else good,
                         fields["label"]: int(label) if label.lstrip("-").isdigit() else label})
        else:
            rows.append({fields.get("prompt", "prompt"): f"what color is cat {i} ?",
                         fields.get("chosen", "chosen"): good, fields.get("rejected", "rejected"): bad})
    return rows


def tiny_model(folder: Path) -> None:
    """A random-init 2-layer OPT (hidden 64) with the built-in word-level tokenizer, saved to `folder`."""
    from transformers import AutoTokenizer, OPTConfig, OPTForCausalLM

    from pipeline.data.builtin import save_tokenizer

    tokenizer = AutoTokenizer.from_pretrained(save_tokenizer(folder))
    shape = dict(hidden_size=64, word_embed_proj_dim=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4)
    OPTForCausalLM(OPTConfig(vocab_size=len(tokenizer), **shape)).save_pretrained(folder)


def stand_ins(words: tuple[str, ...], base: Path, demo_run: Callable[[], Path]) -> list[str]:
    """`words` with the README's example paths (PLACEHOLDERS) replaced by real ones under `base`;
    `demo_run()` gives the demo run (built when first asked for)."""
    fields = {w.split("=", 1)[0].rsplit(".", 1)[1]: w.split("=", 1)[1]
              for w in words if w.startswith("data_blend.fields.") and "=" in w}
    out = []
    for word in words:
        key, sep, value = word.rpartition("=") if "=" in word and not word.startswith("-") else ("", "", word)
        for placeholder in PLACEHOLDERS:
            if not value.startswith(placeholder):
                continue
            rest = value[len(placeholder):]
            if placeholder == "outputs/demo":
                value = f"{demo_run()}{rest}"
            elif placeholder == "/runs/":
                value = str(base / "runs" / rest)
                stage_model = re.fullmatch(r"[^/]+/(sft|rm|dpo|ppo)/final(/\w+)?", rest)
                if stage_model and not Path(value).exists():
                    tiny_model(Path(value))
            elif placeholder == "/data/hh-rlhf/":
                value = str(ROOT.parent / "shared" / "data" / "hh-rlhf" / rest)
            else:
                value = str(base / placeholder)
                if placeholder.endswith(".jsonl"):
                    base.mkdir(parents=True, exist_ok=True)
                    Path(value).write_text("".join(json.dumps(r) + "\n" for r in _demo_rows(fields)))
            break
        out.append(f"{key}{sep}{value}")
    return out


# --------------------------------------------------------------------------- python -m pipeline

def _sweep(args: list[str]) -> tuple[int, list[str]]:
    """The number of jobs a Hydra sweep over `args` runs, and `args` with each sweep at its first value."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    jobs, first = 1, []
    for word, override in zip(args, OverridesParser.create().parse_overrides(args)):
        if override.is_sweep_override():
            values = list(override.sweep_string_iterator())
            jobs *= len(values)
            word = f"{word.split('=', 1)[0]}={values[0]}"
        first.append(word)
    return jobs, first


def dry_runs(args: list[str], base: Path) -> list[tuple[tuple[str, ...], str, int]]:
    """The `python -m pipeline` words (after the stand-ins) -> the argument lists that check it here:
    (arguments, a pattern its output must match, how many times).

    A plain command: itself with run.dry_run=true and a run folder under `base`. A sweep (-m): its
    jobs as local dry runs, less the SLURM launcher's words (no cluster here; tests/test_slurm.py
    submits the first README sweep to a one-node SLURM), and, with the launcher, the whole command
    at each sweep's first value, composed and resolved by Hydra (--cfg all --resolve): the launcher's
    keys exist and its settings resolve."""
    if "-m" not in args and "--multirun" not in args:
        extra = [] if "run.dry_run=true" in args else ["run.dry_run=true"]
        if not any(a.startswith("run.output_dir=") for a in args):
            extra.append(f"run.output_dir={base / 'run'}")
        return [((*args, *extra), r"^stage:$" if "--cfg" in args else DRY_RUN_DONE, 1)]
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    launcher = [a for a in overrides if a.lstrip("+").startswith(("hydra/launcher=", "hydra.launcher."))]
    local = [a for a in overrides if a not in launcher]
    jobs, first = _sweep(overrides)
    runs = [(("-m", *local, "run.dry_run=true", f"hydra.sweep.dir={base / 'sweep'}"), DRY_RUN_DONE, jobs)]
    if launcher:
        runs.append((("--cfg", "all", "--resolve", *first), r"_target_: hydra_plugins\.hydra_submitit_launcher\.", 1))
    return runs


def run_in_one_process(argvs: list[list[str]]) -> list[dict]:
    """`python -m pipeline ARGV` for each ARGV, one after another in one Python process (the import
    of torch and the rest is paid once): the Hydra entry point a user's command runs, with its
    sys.argv; exit status, stdout and stderr of each."""
    proc = subprocess.run([sys.executable, str(Path(__file__)), "--run-pipeline-commands"], cwd=ROOT,
                          input=json.dumps(argvs), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout)


def _pipeline_commands_main() -> None:
    import contextlib
    import traceback

    import pipeline.__main__ as app

    results = []
    for argv in json.load(sys.stdin):
        out, err, code = io.StringIO(), io.StringIO(), 0
        sys.argv = ["pipeline", *argv]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                app.run()
            except SystemExit as stop:
                code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
            except BaseException:
                traceback.print_exc()
                code = 1
        results.append({"code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    json.dump(results, sys.__stdout__)


# --------------------------------------------------------------------------- the checks

@dataclass
class Checked:
    """What a check needs: the stand-ins' folder, the demo run, the dry runs' results, the stdin a
    `|` feeds the command, and pytest's monkeypatch and capsys."""

    base: Path
    demo_run: Callable[[], Path]
    dry_run_results: dict[tuple[str, ...], dict]
    stdin: str | None
    monkeypatch: pytest.MonkeyPatch
    capsys: pytest.CaptureFixture


def check_pipeline(words: list[str], c: Checked) -> str:
    out = []
    for args, expected, times in dry_runs(words[3:], c.base):
        result = c.dry_run_results[args]
        printed = result["stdout"] + result["stderr"]
        assert result["code"] == 0, f"exit {result['code']} for python -m pipeline {' '.join(args)}:\n{printed[-3000:]}"
        found = len(re.findall(expected, printed, re.MULTILINE))
        assert found == times, f"{expected!r} printed {found} times, not {times}:\n{printed[-3000:]}"
        out.append(result["stdout"])
    return "".join(out)


def _in_process(main: Callable[[list[str]], int], args: list[str], c: Checked) -> str:
    """main(args) in this process, from the repository's folder (the README's relative paths), with
    c.stdin as its standard input; its stdout."""
    if any("../shared/data/" in a for a in args) and not (ROOT.parent / "shared" / "data").is_dir():
        pytest.skip("../shared/data is not beside the project")
    c.monkeypatch.chdir(ROOT)
    c.monkeypatch.setattr(sys, "stdin", io.StringIO(c.stdin if c.stdin is not None else "quit\n"))
    c.capsys.readouterr()
    code = main(args)
    out, err = c.capsys.readouterr()
    assert code == 0, f"exit {code}:\n{(out + err)[-3000:]}"
    return out


def check_chat(words: list[str], c: Checked) -> str:
    from pipeline.chat import main

    out = _in_process(main, words[3:], c)
    questions = [q for q in (c.stdin or "quit\n").splitlines() if q.strip() and q.strip() not in ("quit", "clear")]
    assert len([line for line in out.splitlines() if line.strip()]) == len(questions), out
    return out


def check_evaluate(words: list[str], c: Checked) -> str:
    from pipeline.evaluate import main

    args = words[3:]
    if "--help" in args:
        out = _in_process(main, args, c)
        assert "max_new_tokens" in out, out
        return out
    out = _in_process(main, [*args, "limit=2", "max_new_tokens=4"], c)
    written = [a.split("=", 1)[1] for a in args if a.startswith("out=")]
    assert all(Path(path).is_file() for path in written), written
    return out


def check_report(words: list[str], c: Checked) -> str:
    from pipeline.report import main

    run = Path(words[3])
    assert run == c.demo_run(), f"{words[3]}: expected the demo run"
    copy = c.base / "run"  # the report is rewritten: on a copy, the demo run is shared
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("data_cache", "checkpoints", "base_models"))
    (copy / "report.md").unlink()
    out = _in_process(main, [str(copy), *words[4:]], c)
    assert (copy / "report.md").is_file() and f"report: {copy / 'report.md'}" in out, out
    return out


def check_bench(words: list[str], c: Checked) -> str:
    proc = subprocess.run([sys.executable, *words[1:], "--help"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "usage:" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
    return proc.stdout


def check_pip(words: list[str], c: Checked) -> str:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    import torch

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for word in words[2:]:
        if word == "-e":
            continue
        if word.startswith("torch=="):  # the CPU build's pin (a GPU machine drops it, as the README says)
            assert torch.version.cuda or torch.__version__.split("+")[0] == word.split("==")[1], torch.__version__
            continue
        spec = re.fullmatch(r"\.(?:\[([\w,-]+)\])?", word)
        assert spec, f"{word}: no check for this pip argument"
        missing = [e for e in (spec.group(1) or "").split(",") if e and e not in extras]
        assert not missing, f"{word}: pyproject.toml has no extra {missing} (it has {sorted(extras)})"
    return ""


def check_pytest_marker(words: list[str], c: Checked) -> str:
    tomllib = pytest.importorskip("tomllib")
    markers = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]["markers"]
    assert any(m.split(":")[0] == words[2] for m in markers), f"marker {words[2]} is not registered: {markers}"
    return ""


def check_printf(words: list[str], c: Checked) -> str:
    return subprocess.run(["printf", *words[1:]], capture_output=True, text=True, check=True).stdout


# (pattern of the command's words joined by spaces, its check); the first that matches checks it.
CHECKS: list[tuple[str, Callable[[list[str], Checked], str]]] = [
    (r"python3? -m pipeline( |$)", check_pipeline),
    (r"python3? -m pipeline\.chat( |$)", check_chat),
    (r"python3? -m pipeline\.evaluate( |$)", check_evaluate),
    (r"python3? -m pipeline\.report( |$)", check_report),
    (r"python3? bench/\w+\.py( |$)", check_bench),
    (r"pip install ", check_pip),
    (r"pytest -m \w+$", check_pytest_marker),
    (r"printf ", check_printf),
]


def commands_of(snippet: Snippet) -> list[Command]:
    return shell_commands(f"python -m pipeline {snippet.text}" if snippet.kind == "override" else snippet.text)


def _is_pipeline(command: Command) -> bool:
    return re.match(CHECKS[0][0], command.text) is not None


@pytest.fixture(scope="module")
def dry_run_results(tmp_path_factory, request) -> tuple[Path, dict]:
    """Every `python -m pipeline` command of the README as its dry runs (see dry_runs), all in one
    process: (the stand-ins' root folder, {arguments: result})."""
    root = tmp_path_factory.mktemp("readme")
    planned: list[tuple[str, ...]] = []
    for index, snippet in enumerate(SNIPPETS):
        try:
            commands = commands_of(snippet)
        except ValueError:
            continue  # test_readme_command says so
        for k, command in enumerate(commands):
            if _is_pipeline(command) and command.text not in SKIPPED:
                base = root / f"{index}-{k}"
                words = stand_ins(command.words, base, lambda: request.getfixturevalue("demo_run"))
                planned += [args for args, _, _ in dry_runs(words[3:], base)]
    return root, dict(zip(planned, run_in_one_process([list(a) for a in planned])))


@pytest.mark.parametrize("index", range(len(SNIPPETS)), ids=[s.id for s in SNIPPETS])
def test_readme_command(index: int, dry_run_results, request, monkeypatch, capsys):
    snippet = SNIPPETS[index]
    where = f"README.md:{snippet.line}: {snippet.text}"
    try:
        commands = commands_of(snippet)
    except ValueError as err:
        pytest.fail(f"{where}: a shell cannot split it ({err})")
    if all(c.text in SKIPPED for c in commands):
        pytest.skip("; ".join(SKIPPED[c.text] for c in commands))
    globs = unquoted_globs(snippet.text)
    assert not globs, f"{where}: quote {globs} ('...'): zsh stops at an unquoted [ ] * ?, bash expands it"
    root, results = dry_run_results

    def demo_run() -> Path:  # built (or reused from other tests) only for a command that names it
        return request.getfixturevalue("demo_run")

    stdout = None
    for k, command in enumerate(commands):
        if command.text in SKIPPED:
            continue
        check = next((check for pattern, check in CHECKS if re.match(pattern, command.text)), None)
        assert check is not None, (f"{where}: no check for `{command.text}`: add one to CHECKS in "
                                   "tests/test_readme.py, or the reason it cannot run here to SKIPPED")
        base = root / f"{index}-{k}"
        words = stand_ins(command.words, base, demo_run)
        try:
            stdout = check(words, Checked(base, demo_run, results, stdout if command.piped else None,
                                          monkeypatch, capsys))
        except AssertionError as err:
            raise AssertionError(f"{where}: {command.text}: {err}") from None


def test_skips_and_stand_ins_are_still_used():
    """SKIPPED and PLACEHOLDERS name only what README.md still prints (no stale excuses)."""
    commands = [c.text for s in SNIPPETS for c in commands_of(s)]
    assert set(SKIPPED) <= set(commands), set(SKIPPED) - set(commands)
    unused = [p for p in PLACEHOLDERS if not any(p in c for c in commands)]
    assert not unused, unused


def test_readme_paths_and_names_exist():
    """Every repository path (`pipeline/...`, `bench/...`, ...) and every `pipeline.x.y` name the README
    gives in backticks exists; a path inside the installed package (`pipeline/conf`) is looked up where
    pyproject.toml's package-dir takes it from; the README's Python imports run."""
    import importlib

    tomllib = pytest.importorskip("tomllib")
    package_dirs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    text = README.read_text()
    spans = re.findall(r"`([^`]+)`", re.sub(r"^```.*?^```", "", text, flags=re.DOTALL | re.MULTILINE))
    missing = []
    for path in {s for s in spans if re.fullmatch(r"(pipeline|stages|bench|conf|launchers|tests|\.ci)/[\w./-]*", s)}:
        package = next((p for p in package_dirs if (path + "/").startswith(p.replace(".", "/") + "/")), None)
        real = package_dirs[package] + path[len(package.replace(".", "/")):] if package else path
        if not (ROOT / real).exists():
            missing.append(path)
    for name in {m for s in spans for m in re.findall(r"^pipeline(?:\.\w+)+$", s)}:
        parts, target = name.split("."), None
        for i in range(len(parts), 0, -1):  # the longest prefix that imports, then attributes
            try:
                target = importlib.import_module(".".join(parts[:i]))
            except ImportError:
                continue
            for attr in parts[i:]:
                target = getattr(target, attr, None)
            break
        if target is None:
            missing.append(name)
    assert not missing, f"README.md names what is not there: {sorted(missing)}"
    imports = re.findall(r"^(from pipeline[\w.]* import [\w, ]+)", text.replace("`", "\n"), re.MULTILINE)
    assert len(imports) >= 2, imports
    for line in imports:
        exec(line, {})


def test_readme_snippets_and_shell_splitting():
    text = """intro `pip install -e '.[x]'` and `not a command`

    python -m pipeline a=1 \\
        b=2   # why

| group | example override |
|---|---|
| `m` | `k='1,2'` |

```bash
echo one && printf 'x\\n' | cat
```
```
python -m pipeline output, not a command
```
"""
    snippets = readme_snippets(text)
    assert [(s.line, s.text, s.kind) for s in snippets] == [
        (1, "pip install -e '.[x]'", "inline"), (3, "python -m pipeline a=1 b=2   # why", "block"),
        (8, "k='1,2'", "override"), (11, "echo one && printf 'x\\n' | cat", "block")]
    assert shell_commands(snippets[1].text) == [Command(("python", "-m", "pipeline", "a=1", "b=2"))]
    assert shell_commands(snippets[3].text) == [Command(("echo", "one")), Command(("printf", "x\\n")),
                                                Command(("cat",), piped=True)]
    assert shell_commands("python -m pipeline data_blend.split='6,2,2'")[0].words[-1] == "data_blend.split=6,2,2"
    assert shell_commands("""python -m pipeline "data_blend.split='6,2,2'" """)[0].words[-1] == "data_blend.split='6,2,2'"
    assert unquoted_globs("python -m pipeline run.stages=[sft,rm] 'a=[b]' \"c=*\" d=? # e=[f]") == [
        "run.stages=[sft,rm]", "d=?"]
    with pytest.raises(ValueError):
        shell_commands("python -m pipeline 'unclosed")


if __name__ == "__main__" and sys.argv[1:] == ["--run-pipeline-commands"]:
    _pipeline_commands_main()

