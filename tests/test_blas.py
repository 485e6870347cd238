import json
import os
import subprocess
import sys
import textwrap

from bit_axon import blas
from bit_axon.backend import Backend

import pytest

SCRIPT = textwrap.dedent(
    """
    import json
    import bit_axon
    import mlx.core as mx
    import numpy as np
    from bit_axon import BitAxonConfig, BitAxonModel
    from bit_axon.blas import blas_in_use

    rng = np.random.default_rng(0)
    a = rng.standard_normal((300, 200)).astype(np.float32)
    b = rng.standard_normal((200, 100)).astype(np.float32)
    mx.random.seed(0)
    model = BitAxonModel(BitAxonConfig.small(vocab_size=300, hidden_dim=64, d_source_model=64, moe_intermediate_dim=64))
    logits, _ = model(mx.array([[1, 2, 3, 4, 5, 6]]))
    print(json.dumps({
        "blas": blas_in_use(),
        "matmul": np.array(mx.array(a) @ mx.array(b)).tolist(),
        "logits": np.array(logits).tolist(),
    }))
    """
)


def _run(env_blas: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "BIT_AXON_BLAS"}
    if env_blas is not None:
        env["BIT_AXON_BLAS"] = env_blas
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, check=True, timeout=120)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the BLAS preload is Linux-only")
def test_optimized_blas_gives_the_same_results_as_mlx_bundled_blas():
    import numpy as np

    reference = _run("off")
    default = _run(None)
    assert reference["blas"] == "mlx-bundled"
    np.testing.assert_allclose(default["matmul"], reference["matmul"], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(default["logits"], reference["logits"], rtol=1e-4, atol=1e-4)
    if blas.candidates():
        assert default["blas"] != "mlx-bundled"  # a library was there, so it must be in use


def test_opt_out_and_explicit_choice():
    for off in ("off", "0", "mlx", "none"):
        assert blas.candidates(Backend.from_env({"BIT_AXON_BLAS": off})) == []
    assert blas.candidates(Backend.from_env({"BIT_AXON_BLAS": "/opt/my/libopenblas.so"})) == ["/opt/my/libopenblas.so"]


def test_cmeel_openblas_only_offered_with_avx512(monkeypatch):
    monkeypatch.delenv("BIT_AXON_BLAS", raising=False)
    monkeypatch.setattr(blas, "_cpu_flags", lambda: {"avx2", "fma"})
    assert blas._cmeel_openblas() == []
