"""Every python block of every docs/*.md runs as written.

The blocks of one file run in order in one namespace (later examples build on earlier ones), each file in a fresh
interpreter with a time limit, so one page's imports, registrations or thread settings cannot leak into another's.
"""
import json
import os
import subprocess
import sys

import pytest

from _doc_blocks import ROOT, doc_blocks

DOCS = sorted((ROOT / "docs").glob("*.md"))
TIMEOUT_S = 240

# Runs the blocks it gets on stdin in one namespace, naming the failing block by its file and fence line.
_RUNNER = """
import json, sys
doc, blocks = json.load(sys.stdin)
namespace = {"__name__": "__main__"}
for line, code in blocks:
    exec(compile(code, f"{doc}[python block at line {line}]", "exec"), namespace)
"""


def test_docs_have_runnable_examples():
    runnable = {doc.name: sum(b.no_run is None for b in doc_blocks(doc)) for doc in DOCS}
    assert len(DOCS) >= 8 and runnable["vlm.md"] >= 5 and runnable["msvmamba.md"] >= 3, runnable


@pytest.mark.parametrize("doc", DOCS, ids=[d.name for d in DOCS])
def test_doc_python_blocks_run(doc, tmp_path):
    blocks = [(b.line, b.code) for b in doc_blocks(doc) if b.no_run is None]
    if not blocks:
        pytest.skip(f"docs/{doc.name} has no runnable python block")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.setdefault("OMP_NUM_THREADS", "1")
    result = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps([f"docs/{doc.name}", blocks]),
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=TIMEOUT_S)
    assert result.returncode == 0, f"docs/{doc.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-6000:]}"
