"""Fault injection (issue 18): a training run killed with SIGKILL at random moments, over and over,
each time resumed. Every resume must start from the newest intact checkpoint, and every checkpoint
and model folder must load after every kill. Bounded to about a minute."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

from bit_axon.loading import load_weights
from bit_axon.training.checkpoint import ADAPTERS_FILE, OPTIMIZER_FILE, STATE_FILE

import mlx.core as mx

SCRIPT = Path(__file__).with_name("fault_run.py")
TESTS = Path(__file__).parents[1]
BUDGET_S = 60.0
MIN_KILLS = 5
STEP_DIR = re.compile(r"^step_(\d{8})$")
UNFINISHED = re.compile(r"^\.step_(\d{8})\..*tmp$")


def intact(folder: Path) -> bool:
    """The test's own check, independent of ``recovery``: all three files read back."""
    try:
        for name in (ADAPTERS_FILE, OPTIMIZER_FILE):
            mx.eval(mx.load(str(folder / name), format="safetensors"))
        return isinstance(json.loads((folder / STATE_FILE).read_text())["step"], int)
    except (OSError, RuntimeError, ValueError, KeyError):
        return False


def expected_start(run: Path) -> int:
    """The step a resume must start from: the newest intact checkpoint, counting a complete unfinished
    save whose step has no folder (it is renamed into place)."""
    steps = [int(m.group(1)) for p in run.glob("step_*") if (m := STEP_DIR.match(p.name)) and intact(p)]
    steps += [
        int(m.group(1)) for p in run.glob(".step_*")
        if (m := UNFINISHED.match(p.name)) and intact(p) and not (run / f"step_{m.group(1)}").exists()
    ]
    return max(steps, default=0)


def start(output: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_random_kills_never_lose_a_checkpoint_or_a_model(tmp_path):
    rng = random.Random(18)
    run, model_dir = tmp_path / "run", tmp_path / "base_model"
    kills = resumes = 0
    deadline = time.monotonic() + BUDGET_S
    while kills < MIN_KILLS or time.monotonic() < deadline:
        expected = expected_start(run)
        proc = start(tmp_path)
        try:
            assert proc.stdout.readline().strip() == "READY", proc.stderr.read()
            time.sleep(rng.uniform(0.0, 2.5))  # from the model write, through the resume, into the saves
        finally:
            proc.kill()
            out, err = proc.communicate()
        kills += 1
        assert "Traceback" not in err, err
        if started := re.search(r"^START (\d+)$", out, re.MULTILINE):
            resumes += 1
            assert int(started.group(1)) == expected, f"kill {kills}: resumed from {started.group(1)}, not {expected}"
        # After every kill: every checkpoint folder and the model folder load.
        for folder in run.glob("step_*"):
            if STEP_DIR.match(folder.name):
                assert intact(folder), f"{folder} does not load after kill {kills}"
        if model_dir.is_dir() and any(model_dir.glob("*.safetensors")):
            mx.eval(load_weights(model_dir))
    print(f"\n{kills} kills, {kills} survived; {resumes} resumes seen starting from the newest intact checkpoint")
    assert expected_start(run) > 0, "no checkpoint was ever written: the kills came too early"
