"""Small things of the command line a user meets first: an output that is a file gets one line
from every command that reads one, and `run --help` lists every device."""

from __future__ import annotations

import pytest
from conftest import invoke

READERS = [["inspect"], ["verify"], ["status"], ["files"], ["query", "{out}", "SELECT 1"], ["heads"],
           ["plot", "{out}", "--grid", "entropy_norm", "-o", "{png}"], ["report", "{out}", "-o", "{html}"]]


@pytest.mark.parametrize("command", READERS, ids=lambda c: c[0])
def test_output_that_is_a_file_is_one_line(tmp_path, command):
    path = tmp_path / "not-a-folder"
    path.write_text("x")
    args = [a.format(out=path, png=tmp_path / "x.png", html=tmp_path / "x.html") for a in command]
    result = invoke(*(args if len(args) > 1 else args + [path]))
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith("Error:") and str(path) in lines[-1]


def test_run_help_lists_every_device():
    assert "mps" in invoke("run", "--help").output
