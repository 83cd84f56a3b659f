"""The README's examples run as written, and its commands are the ones CI uses."""
import re

import pytest

from _doc_blocks import ROOT, doc_blocks

README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = doc_blocks(ROOT / "README.md")


@pytest.mark.parametrize("block", PYTHON_BLOCKS, ids=[f"line{b.line}" for b in PYTHON_BLOCKS])
def test_readme_python_examples_run(block):
    if block.no_run:
        pytest.skip(block.no_run)
    exec(compile(block.code, f"README.md[python block at line {block.line}]", "exec"), {})


def test_ci_runs_exactly_the_readme_test_command():
    after = README.split("Run the tests", 1)[1]
    test_command = re.search(r"```bash\n(.*?)```", after, flags=re.S).group(1).strip()
    ci_lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert test_command in ci_lines
    assert ci_lines[-1] == test_command  # the tests are the last thing CI runs: their status is CI's
