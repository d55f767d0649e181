"""benchmarks/device_check.sh, the prepared accelerator run: every flag it passes exists.

The script runs only where a session is lent a device, so a renamed benchmark flag would
first fail there, on scarce time. Its full smoke run (``SMOKE=1``, about 9 minutes on this
project's 2 CPU cores) is too slow for the suite; this checks its syntax and that each
``python benchmarks/X.py --flag`` it runs is one that X's parser knows.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "device_check.sh"
FLAG = re.compile(r"(?<!\S)(--[\w-]+)")  # a long option, as a command line or --help writes it


def _commands(text: str) -> list[tuple[str, list[str]]]:
    """``(benchmark path, [--flags])`` of each ``python benchmarks/X.py ...`` command (continuations joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for m in re.finditer(r"python (benchmarks/\w+\.py)([^\n]*)", joined):
        out.append((m.group(1), FLAG.findall(m.group(2))))
    return out


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_the_script_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)


def _unknown_flags(text: str, helps: dict[str, str]) -> dict[str, list[str]]:
    """``{benchmark: [flags its --help does not list]}`` for the commands of ``text``."""
    unknown = {}
    for path, flags in _commands(text):
        if path not in helps:
            helps[path] = subprocess.run([sys.executable, str(ROOT / path), "--help"], capture_output=True,
                                         text=True, check=True, cwd=ROOT).stdout
        missing = sorted(set(flags) - set(FLAG.findall(helps[path])))
        if missing:
            unknown[path] = missing
    return unknown


@pytest.mark.slow  # four benchmarks' --help, each importing jax: about 11 s
def test_every_flag_it_passes_is_known_to_its_benchmark():
    text = SCRIPT.read_text()
    commands = _commands(text)
    assert {c for c, _ in commands} == {"benchmarks/throughput.py", "benchmarks/evaluation.py",
                                        "benchmarks/train_many.py", "benchmarks/train_table.py"}
    assert all(flags for _, flags in commands)
    helps: dict[str, str] = {}
    assert _unknown_flags(text, helps) == {}
    # negative control: a misspelt flag is caught
    assert _unknown_flags(text.replace("--num-points", "--num-pointz"), helps) == {
        "benchmarks/evaluation.py": ["--num-pointz"]}
