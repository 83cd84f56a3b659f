"""The README's examples run as written, and its commands are the ones CI uses."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str):
    return re.findall(rf"```{lang}\n(.*?)```", README, flags=re.S)


@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_readme_python_examples_run(index):
    exec(compile(_blocks("python")[index], f"README.md[python block {index}]", "exec"), {})


def test_ci_runs_exactly_the_readme_test_command():
    after = README.split("Run the tests", 1)[1]
    test_command = re.search(r"```bash\n(.*?)```", after, flags=re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert ci_lines[-1] == test_command  # the tests are the last thing CI runs: their status is CI's
