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


def test_unwritable_hf_home_does_not_stop_a_local_run(tmp_path, tiny_model_dir):
    """HF_HOME (and the datasets cache) on a path nobody can create: a run on a local corpus and
    model needs neither, so it completes; nothing it needs is written there."""
    import json
    import os
    import subprocess
    import sys

    from conftest import write_job

    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "hello world"}) + "\n")
    job = write_job(tmp_path, corpus, model=tiny_model_dir("bert"), device="cpu")
    env = {**os.environ, "HF_HOME": "/proc/attnpipe-nowhere/hf", "HF_DATASETS_CACHE": "/proc/attnpipe-nowhere/ds"}
    done = subprocess.run([sys.executable, "-m", "attnpipe.cli", "run", str(job), "-q"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("code, rc, err", [(0, 0, ""), (None, 0, ""), (3, 3, ""), ("Error: bad job", 1, "Error: bad job\n")])
def test_the_command_leaves_as_sys_exit_would(code, rc, err):
    """`attnpipe` ends through cli.leave (os._exit, no interpreter teardown): the exit code, the
    streams' buffered text and the atexit handlers are those of sys.exit."""
    import subprocess
    import sys

    script = ("import atexit, sys\nfrom attnpipe.cli import leave\n"
              "atexit.register(lambda: print('atexit ran'))\nprint('buffered', end=' ')\n"
              f"leave({code!r})\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout, done.stderr) == (rc, "buffered atexit ran\n", err)


def test_the_command_line_exit_codes():
    import subprocess
    import sys

    def attnpipe(*args):
        return subprocess.run([sys.executable, "-m", "attnpipe.cli", *args], capture_output=True, text=True,
                              timeout=120)

    version = attnpipe("--version")
    assert version.returncode == 0 and "attnpipe, version" in version.stdout
    missing = attnpipe("run", "no-such-job.toml")
    assert missing.returncode == 1 and missing.stderr.strip() == "Error: job file not found: no-such-job.toml"
    assert attnpipe("no-such-command").returncode == 2
