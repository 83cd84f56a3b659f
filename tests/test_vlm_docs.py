"""Every python block in docs/vlm.md runs as written."""
import re
from pathlib import Path

import pytest

DOC = (Path(__file__).resolve().parents[1] / "docs" / "vlm.md").read_text()
BLOCKS = re.findall(r"```python\n(.*?)```", DOC, flags=re.S)


def test_docs_have_examples():
    assert len(BLOCKS) >= 5


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_vlm_doc_python_block_runs(index):
    exec(compile(BLOCKS[index], f"docs/vlm.md[python block {index}]", "exec"), {})
