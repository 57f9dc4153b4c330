"""The ```sh blocks of README.md and docs/*.md run, so that they cannot rot.

Each document's blocks run in order in one bash script (a later block uses what an earlier one
defined: `$D`, probe.h5, …) in a scratch directory where the data the blocks name is the sample:
`data.h5` and `../shared/data/multi30k-de2en-e5.h5` are sample_data/multi30k-sample.h5 (same
datasets, smaller). A block that cannot run in the suite says so in the document source, on the
line before its fence: `<!-- doc-test: skip: WHY -->`, or `<!-- doc-test: needs MODULE -->` for an
optional extra (skipped when it is not installed); every other block must run. The figures the
text quotes are the shared data's (checked by hand: the commit says how), not the sample's.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SAMPLE = ROOT / "sample_data" / "multi30k-sample.h5"
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
DATA_NAMES = ("data.h5", "../shared/data/multi30k-de2en-e5.h5")  # what the blocks call the data
MARKER = re.compile(r"^<!-- doc-test: (?:skip: (?P<why>.+)|needs (?P<module>[\w.]+)) -->$")
START = "::doc-block "  # printed on stderr before each block: which one failed
pytestmark = pytest.mark.slow  # about a minute of commands: left out of .ci/run's reruns under other kernels


@dataclass(frozen=True)
class Block:
    document: Path
    line: int          # of the opening fence, 1-based
    text: str
    skip: str | None   # why it cannot run in the suite
    needs: str | None  # an optional module it needs

    @property
    def name(self) -> str:
        return f"{self.document.relative_to(ROOT)}:{self.line}"

    def reason(self) -> str | None:
        if self.skip:
            return self.skip
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"needs {self.needs}, not installed"
        return None


def blocks(document: Path) -> list[Block]:
    lines = document.read_text(encoding="utf-8").splitlines()
    found, i = [], 0
    while i < len(lines):
        if lines[i].strip() == "```sh":
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "```")
            marker = MARKER.match(lines[i - 1].strip()) if i else None
            found.append(Block(document, i + 1, "\n".join(lines[i + 1:end]), marker and marker["why"],
                               marker and marker["module"]))
            i = end
        i += 1
    return found


BLOCKS = [b for d in DOCUMENTS for b in blocks(d)]


def run_document(document: Path, where: Path) -> dict[str, str | None]:
    """Run a document's runnable blocks in order; {block name: None (ran) or what went wrong}."""
    work = where / "work"
    work.mkdir()
    for name in DATA_NAMES:
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).symlink_to(SAMPLE)
    (work / "benchmarks").symlink_to(ROOT / "benchmarks")
    runnable = [b for b in blocks(document) if b.reason() is None]
    script = "set -euo pipefail\n" + "".join(f"echo '{START}{b.name}' >&2\n{b.text}\n" for b in runnable)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "QBNORM_DEBUG": ""}
    proc = subprocess.run(["bash", "-c", script], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode == 0:
        return {b.name: None for b in runnable}
    started = [line[len(START):] for line in proc.stderr.splitlines() if line.startswith(START)]
    failed = started[-1] if started else runnable[0].name
    tail = "\n".join(proc.stderr.splitlines()[-15:])
    results = {}
    for b in runnable:
        if b.name == failed:
            results[b.name] = f"exit {proc.returncode}:\n{tail}"
            break
        results[b.name] = None
    return results  # the blocks after the failing one did not run


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    cache: dict[Path, dict] = {}

    def of(block: Block):
        if block.document not in cache:
            cache[block.document] = run_document(block.document, tmp_path_factory.mktemp("doc"))
        return cache[block.document]

    return of


@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_shell_block_runs(outcomes, block):
    if (why := block.reason()) is not None:
        pytest.skip(f"{block.name}: {why}")
    results = outcomes(block)
    assert block.name in results, f"{block.name} did not run: an earlier block of the document failed"
    assert results[block.name] is None, f"{block.name} failed, {results[block.name]}"


def test_blocks_are_found_and_markers_are_well_formed():
    assert len(BLOCKS) >= 10
    for document in DOCUMENTS:
        for number, line in enumerate(document.read_text(encoding="utf-8").splitlines(), 1):
            if line.startswith("<!-- doc-test"):
                assert MARKER.match(line.strip()), f"{document.name}:{number}: malformed marker {line!r}"
