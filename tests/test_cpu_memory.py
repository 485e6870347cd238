import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

# Page faults while MLX writes a fresh 32 MB array, after an array of the same size was freed.
SCRIPT = textwrap.dedent(
    """
    import json, resource
    import bit_axon
    import mlx.core as mx
    from bit_axon.cpu_memory import keeps_freed_memory

    a = mx.ones((8 * 1024 * 1024,))
    mx.eval(a)
    faults = []
    for _ in range(3):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        b = a + 1
        mx.eval(b)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
        assert b[0].item() == 2.0
        del b
    print(json.dumps({"keeps": keeps_freed_memory(), "faults": faults}))
    """
)

glibc_only = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="tunes glibc's malloc"
)


def _run(setting: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BIT_AXON_MALLOC"}
    if setting is not None:
        env["BIT_AXON_MALLOC"] = setting
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@glibc_only
def test_keep_reuses_freed_arrays_without_page_faults():
    kept = _run("keep")
    assert kept["keeps"]
    # Once one 32 MB buffer has been freed, the next ones reuse its pages (8,192 of them).
    assert max(kept["faults"][1:]) < 100, kept
    for default in (_run(None), _run("system")):
        assert not default["keeps"]
        assert min(default["faults"]) > 4000, default  # glibc's default: fresh pages for every array


def test_unknown_setting_is_an_error(monkeypatch):
    from bit_axon.cpu_memory import keep_freed_memory

    monkeypatch.setenv("BIT_AXON_MALLOC", "fast")
    with pytest.raises(ValueError, match="BIT_AXON_MALLOC must be 'keep' or 'system', not 'fast'"):
        keep_freed_memory()
