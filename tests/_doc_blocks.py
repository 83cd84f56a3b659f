"""Python blocks of the project's markdown, for the tests that run them as written.

A block preceded (on the line just above its fence) by an HTML comment ``<!-- no-run: reason -->`` is one that
genuinely cannot run here (a GPU, a file users bring); it is skipped and the reason is kept.
"""
import re
from pathlib import Path
from typing import List, NamedTuple, Optional

ROOT = Path(__file__).resolve().parents[1]
_FENCE = re.compile(r"(?:<!--\s*no-run:\s*(?P<reason>.*?)\s*-->\s*\n)?```(?P<lang>\w+)\n(?P<code>.*?)```", re.S)


class DocBlock(NamedTuple):
    lang: str
    code: str
    line: int  # line of the opening fence, 1-based
    no_run: Optional[str]  # why the block is not run, None when it runs


def doc_blocks(path: Path, lang: str = "python") -> List[DocBlock]:
    """The ``lang`` fenced blocks of the markdown file at ``path``, in document order."""
    text = Path(path).read_text()
    blocks = []
    for match in _FENCE.finditer(text):
        if match.group("lang") != lang:
            continue
        line = text.count("\n", 0, match.start("lang")) + 1
        blocks.append(DocBlock(lang, match.group("code"), line, match.group("reason")))
    return blocks
