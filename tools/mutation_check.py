"""A small mutation check for the core Python files (run by hand, not in CI).

Applies one simple mutant at a time to a chosen file, runs a chosen (fast) test subset on it with a
timeout, and reports which mutants the tests killed and which survived:

- ``arith``: ``+`` <-> ``-`` and ``*`` <-> ``/`` in binary operations, and a dropped unary minus;
- ``compare``: ``<`` <-> ``>=``, ``>`` <-> ``<=``, ``==`` <-> ``!=``, ``is`` <-> ``is not``, ``in`` <-> ``not in``;
- ``off_by_one``: an integer literal ``k`` -> ``k + 1`` (indices, dims, offsets);
- ``drop``: a statement replaced by ``pass`` (docstrings excluded).

The mutant is written into a scratch copy of the repository (the working tree is never touched) and
the tests run there with ``PYTHONPATH`` pointing at it. Docstrings, ``__all__`` and annotations are
not mutated. Example:

    python tools/mutation_check.py zoo/ops/reference.py \\
        --tests "tests/test_ops_reference.py tests/test_ops_ranges.py -k reference" --max-mutants 40
"""
from __future__ import annotations

import argparse
import ast
import copy
import os
import random
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional

REPO = Path(__file__).resolve().parents[1]

_ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}
_COMPARE = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
            ast.NotEq: ast.Eq, ast.Is: ast.IsNot, ast.IsNot: ast.Is, ast.In: ast.NotIn, ast.NotIn: ast.In}


@dataclass
class Mutant:
    index: int  # position of the site in a walk of the module (stable for one source)
    kind: str
    line: int
    what: str


def _skipped_nodes(tree: ast.AST) -> set:
    """Nodes never mutated: docstrings, annotations and ``__all__``."""
    skip = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and isinstance(body[0], ast.Expr) and \
                isinstance(getattr(body[0], "value", None), ast.Constant) and isinstance(body[0].value.value, str):
            skip.update(ast.walk(body[0]))
        for ann in (getattr(node, "annotation", None), getattr(node, "returns", None)):
            if ann is not None:
                skip.update(ast.walk(ann))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skip.update(ast.walk(node))
    return skip


def _sites(tree: ast.AST) -> Iterator[tuple]:
    """(node, kind, description) for every mutation site, in a deterministic order."""
    skip = _skipped_nodes(tree)
    for node in ast.walk(tree):
        if node in skip:
            continue
        if isinstance(node, ast.BinOp) and type(node.op) in _ARITH:
            yield node, "arith", f"{type(node.op).__name__} -> {_ARITH[type(node.op)].__name__}"
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            yield node, "arith", "drop unary minus"
        elif isinstance(node, ast.Compare) and type(node.ops[0]) in _COMPARE:
            yield node, "compare", f"{type(node.ops[0]).__name__} -> {_COMPARE[type(node.ops[0])].__name__}"
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            yield node, "off_by_one", f"{node.value} -> {node.value + 1}"
        if isinstance(node, (ast.FunctionDef, ast.If, ast.For, ast.While, ast.With)):
            for stmt in node.body + getattr(node, "orelse", []):
                if stmt in skip or isinstance(stmt, (ast.Pass, ast.FunctionDef, ast.ClassDef)):
                    continue
                yield stmt, "drop", f"drop `{ast.unparse(stmt).splitlines()[0][:60]}`"


def list_mutants(source: str) -> List[Mutant]:
    tree = ast.parse(source)
    return [Mutant(i, kind, getattr(node, "lineno", 0), what) for i, (node, kind, what) in enumerate(_sites(tree))]


class _DropStatement(ast.NodeTransformer):
    def __init__(self, target: ast.stmt):
        self.target = target

    def generic_visit(self, node):
        super().generic_visit(node)
        for field in ("body", "orelse"):
            stmts = getattr(node, field, None)
            if isinstance(stmts, list) and self.target in stmts:
                i = stmts.index(self.target)
                stmts[i] = ast.copy_location(ast.Pass(), self.target)
        return node


def apply_mutant(source: str, mutant: Mutant) -> str:
    tree = ast.parse(source)
    node, kind, _ = list(_sites(tree))[mutant.index]
    if kind == "arith" and isinstance(node, ast.BinOp):
        node.op = _ARITH[type(node.op)]()
    elif kind == "arith":  # unary minus: -x -> x
        node.op = ast.UAdd()
    elif kind == "compare":
        node.ops[0] = _COMPARE[type(node.ops[0])]()
    elif kind == "off_by_one":
        node.value = node.value + 1
    else:
        tree = _DropStatement(node).visit(tree)
    return ast.unparse(ast.fix_missing_locations(tree))


def run_tests(root: Path, tests: List[str], timeout: float) -> str:
    env = dict(os.environ, PYTHONPATH=str(root), OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return "killed (timeout)"
    finally:  # also on Ctrl-C / SIGTERM: no test run outlives the check
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if code == 0:
        return "survived"
    if code in (1, 3):  # failures, or an error while importing/collecting the mutant
        return "killed"
    return f"error (pytest exit {code})"


def _terminate(signum, frame):
    raise KeyboardInterrupt


def main(argv: Optional[List[str]] = None) -> int:
    signal.signal(signal.SIGTERM, _terminate)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="the file to mutate, relative to the repository root")
    ap.add_argument("--tests", required=True, help="pytest arguments selecting the fast test subset (one string)")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per mutant run (a timeout counts as killed)")
    ap.add_argument("--max-mutants", type=int, default=0, help="run a random sample of this many (0: all)")
    ap.add_argument("--kinds", default="arith,compare,off_by_one,drop", help="comma-separated mutant kinds")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--list", action="store_true", help="only list the mutants")
    ap.add_argument("--repo", type=Path, default=REPO, help="the tree to copy (e.g. an exported older commit)")
    args = ap.parse_args(argv)

    rel = Path(args.file)
    source = (args.repo / rel).read_text()
    kinds = set(args.kinds.split(","))
    mutants = [m for m in list_mutants(source) if m.kind in kinds]
    if args.max_mutants and len(mutants) > args.max_mutants:
        mutants = sorted(random.Random(args.seed).sample(mutants, args.max_mutants), key=lambda m: m.index)
    if args.list:
        for m in mutants:
            print(f"#{m.index:4d} line {m.line:4d} {m.kind:10s} {m.what}")
        return 0
    tests = shlex.split(args.tests)
    with tempfile.TemporaryDirectory(prefix="zoo_mutation_") as tmp:
        root = Path(tmp) / "repo"
        shutil.copytree(args.repo, root, ignore=shutil.ignore_patterns(".git", "__pycache__", "*.so", "runs", "output"))
        target = root / rel
        t0 = time.time()
        baseline = run_tests(root, tests, args.timeout)
        if baseline != "survived":
            print(f"the unmutated tests do not pass ({baseline}); fix that first", file=sys.stderr)
            return 2
        print(f"baseline passes in {time.time() - t0:.0f} s; {len(mutants)} mutants of {rel}", flush=True)
        results = []
        for m in mutants:
            target.write_text(apply_mutant(source, m))
            outcome = run_tests(root, tests, args.timeout)
            results.append((m, outcome))
            print(f"#{m.index:4d} line {m.line:4d} {m.kind:10s} {outcome:18s} {m.what}", flush=True)
        target.write_text(source)
    killed = sum(o.startswith("killed") for _, o in results)
    scored = sum(not o.startswith("error") for _, o in results)
    print(f"\nmutation score for {rel}: {killed}/{scored} killed ({100 * killed / max(scored, 1):.0f}%)")
    survivors = [f"  line {m.line}: {m.kind} {m.what}" for m, o in results if o == "survived"]
    if survivors:
        print("survivors:\n" + "\n".join(survivors))
    return 0


if __name__ == "__main__":
    sys.exit(main())
