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


@pytest.mark.parametrize("index", range(len(PYTHON_BLOCKS)))
def test_python_example_runs(index):
    exec(compile(PYTHON_BLOCKS[index], f"README.md python block {index}", "exec"), {})


def test_quick_start_is_two_commands_and_ci_runs_the_test_one():
    commands = [line.split("#")[0].strip() for line in BASH_BLOCKS[0].strip().splitlines()]
    assert len(commands) == 2
    demo, tests = commands
    assert demo.endswith("python -m mgh_train") and tests.endswith("python -m pytest")
    assert tests in (ROOT / ".ci" / "run").read_text()
