"""README commands checked against the code, so the README, the Makefile and the CLI cannot drift apart.

Every fenced ```bash block of README.md is parsed: the set-up commands at the top are Makefile targets,
every `mmpretrain ...` line (also under `accelerate launch -m mmpretrain ...` / `-m mmpretrain.train`)
parses with the real argparse parser, train overrides load with the real config loader, and every
config, pipelines/ and benchmark path the README names exists. No training, no torch work.
"""

from __future__ import annotations

import contextlib
import glob
import io
import re
import shlex
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
MAKEFILE = (ROOT / "Makefile").read_text(encoding="utf-8")

PLACEHOLDER = re.compile(r"^[A-Z][A-Z0-9_]*(\.\.\.)?$")  # SOURCE..., NAME, RUN_OR_FILE


def bash_blocks(text: str) -> list[str]:
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.M | re.S)


def command_lines(block: str) -> list[str]:
    """The block's commands: `\\` continuations joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = []
    for line in joined.splitlines():
        words = shlex.split(line, comments=True)
        if words:
            lines.append(shlex.join(words))
    return lines


def all_commands() -> list[str]:
    return [cmd for block in bash_blocks(README) for cmd in command_lines(block)]


def makefile_targets(text: str) -> set[str]:
    targets = set()
    for line in text.splitlines():
        m = re.match(r"^([A-Za-z0-9_.$() -]+?)\s*:(?![=])", line)
        if m and not line.startswith("\t"):
            targets.update(t for t in m.group(1).split() if not t.startswith((".", "$")))
    return targets


def recipe(target: str) -> list[str]:
    """The tab-indented command lines under `target:` in the Makefile."""
    lines = MAKEFILE.splitlines()
    start = next(i for i, line in enumerate(lines) if re.match(rf"^{re.escape(target)}\s*:(?!=)", line))
    out = []
    for line in lines[start + 1:]:
        if not line.startswith("\t"):
            break
        out.append(line.strip())
    return out


# -- (1), (2), (6): make targets ------------------------------------------------------------------
def test_setup_commands_are_make_demo_and_make_test():
    first = command_lines(bash_blocks(README)[0])
    assert first == ["make demo", "make test"], f"README's first bash block should be the set-up: {first}"
    assert {"demo", "test"} <= makefile_targets(MAKEFILE)


def test_every_make_target_in_readme_exists():
    targets = makefile_targets(MAKEFILE)
    used = set(re.findall(r"`make ([\w-]+)", README))  # inline code spans
    used |= {cmd.split()[1] for cmd in all_commands() if cmd.startswith("make ") and len(cmd.split()) > 1}
    assert used, "the README names no make targets"
    missing = sorted(used - targets)
    assert not missing, f"README names make targets the Makefile lacks: {missing}"


def test_make_test_runs_the_readme_test_command_and_ci_calls_it():
    test_recipe = " ".join(recipe("test"))
    assert re.search(r"\bpytest\b.*\btests$", test_recipe), f"`make test` runs: {test_recipe!r}"
    # README: `make test   # the suite (pytest -n 2)`: the flags it names are the ones used.
    said = re.search(r"make test\s+#.*\(pytest ([^)]*)\)", README)
    assert said, "README's development block should say what `make test` runs, as (pytest ...)"
    for flag in said.group(1).split():
        assert flag in test_recipe.split(), f"README says `pytest {said.group(1)}`; the Makefile runs {test_recipe!r}"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test$", ci, flags=re.M), ".ci/run should call `make test`"


# -- (3): mmpretrain command lines parse ----------------------------------------------------------
def cli_argv(cmd: str) -> list[str] | None:
    """The argv after `mmpretrain` for a README command, or None when it is not an mmpretrain command."""
    words = shlex.split(cmd)
    if words[0] == "mmpretrain":
        return words[1:]
    if words[:2] == ["accelerate", "launch"] and "-m" in words:
        i = words.index("-m")
        module = words[i + 1]
        if module == "mmpretrain":
            return words[i + 2:]
        if module == "mmpretrain.train":
            return ["train", *words[i + 2:]]
        raise AssertionError(f"README runs an unknown module under accelerate: {cmd}")
    return None


def clean_placeholders(argv: list[str]) -> list[str]:
    """Unwrap `[--opt value]` groups (their options are checked too), drop other `[...]` groups
    (`[options]`, `[section.key=value ...]`), `...` and `SOURCE...`-style placeholders become a value,
    and `a|b|c` alternatives become their first choice."""
    out, group, depth = [], [], 0
    for word in argv:
        if depth == 0 and word.startswith("["):
            depth, group = 1, []
            word = word[1:]
        if depth:
            closed = word.endswith("]")
            group.append(word.rstrip("]") if closed else word)
            if closed:
                depth = 0
                if group and group[0].startswith("-"):
                    out.extend(w for w in group if w and w != "...")
            continue
        out.append(word)
    cleaned = []
    for i, word in enumerate(out):
        if word == "...":
            if i > 0 and out[i - 1].startswith("-"):
                cleaned.append("VALUE")  # `--checkpoint ...`: an option with its value elided
            continue
        if re.fullmatch(r"[\w-]+(\|[\w-]+)+", word):
            word = word.split("|")[0]
        cleaned.append(word.removesuffix("...") if word.endswith("...") and len(word) > 3 else word)
    return cleaned


@pytest.fixture(scope="module")
def parser():
    from mmpretrain.cli import build_parser

    return build_parser()


def mmpretrain_commands() -> list[str]:
    return [cmd for cmd in all_commands() if cli_argv(cmd) is not None]


def test_readme_has_mmpretrain_commands():
    verbs = {cli_argv(c)[0] for c in mmpretrain_commands()}
    assert {"prepare", "inspect", "train", "eval", "export", "demo-data", "plot"} <= verbs


@pytest.mark.parametrize("cmd", mmpretrain_commands())
def test_mmpretrain_command_parses(parser, cmd):
    argv = clean_placeholders(cli_argv(cmd))
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"README command does not parse: {cmd}\n  argv {argv}\n  {err.getvalue().strip()}")


def train_commands() -> list[tuple[str, list[str]]]:
    out = []
    for cmd in mmpretrain_commands():
        argv = clean_placeholders(cli_argv(cmd))
        if argv[0] == "train":
            out.append((cmd, argv))
    return out


@pytest.mark.parametrize("cmd,argv", train_commands(), ids=[c for c, _ in train_commands()])
def test_train_command_config_loads(parser, cmd, argv):
    """The config file and every `section.key=value` override of a README train command load."""
    from mmpretrain.config import load_config
    from mmpretrain.errors import UserError

    args = parser.parse_args(argv)
    overrides = [o for o in args.overrides if "=" in o]
    try:
        load_config(ROOT / args.config, overrides)
    except UserError as e:
        pytest.fail(f"README train command does not load: {cmd}\n  {e}")


# -- (4), (5): paths --------------------------------------------------------------------------------
def mentioned(pattern: str) -> set[str]:
    return {m.rstrip(".,;:") for m in re.findall(pattern, README)}


def test_config_paths_exist():
    paths = mentioned(r"configs/(?:accelerate|train|models)/[\w.*-]+\.(?:yaml|json)")
    for cmd in all_commands():
        words = shlex.split(cmd)
        paths |= {words[i + 1] for i, w in enumerate(words[:-1]) if w in ("--config_file", "--config")}
    concrete = {p for p in paths if not PLACEHOLDER.match(Path(p).stem)}
    assert any(p.startswith("configs/accelerate/") for p in concrete)
    assert any(p.startswith("configs/train/") for p in concrete)
    missing = sorted(p for p in concrete if not glob.glob(str(ROOT / p)))
    assert not missing, f"README names config files that do not exist: {missing}"


def test_pipelines_paths_exist():
    paths = mentioned(r"(?<![\w/])pipelines/[\w./*-]*")
    assert paths, "the README names no pipelines/ paths"
    missing = sorted(p for p in paths if not PLACEHOLDER.match(Path(p).stem) and not glob.glob(str(ROOT / p)))
    assert not missing, f"README names pipelines/ paths that do not exist: {missing}"


def test_benchmark_commands_name_real_scripts():
    scripts = [shlex.split(c)[1] for c in all_commands() if c.startswith(".venv/bin/python ")]
    assert scripts, "the README runs no .venv/bin/python scripts"
    missing = [s for s in scripts if not (ROOT / s).is_file()]
    assert not missing, f"README runs scripts that do not exist: {missing}"
