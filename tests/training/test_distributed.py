"""Data-parallel training: sharding (in process) and a real 2-process ``mlx.launch --backend ring`` run.

The launched run executes this file as a script (``worker``): each rank trains the toy model with
batch size 1, and the test compares what rank 0 wrote with a one-process run with batch size 2.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from itertools import islice
from pathlib import Path

from bit_axon.training.collate import iterate_batches, iterate_orpo_batches
from bit_axon.training.cooling import ThermalShutdownError
from bit_axon.training.distributed import all_sum_tree, broadcast_tree, check_same, gather_rows, shard
from bit_axon.training.orpo_trainer import ORPOTrainer
from bit_axon.training.trainer import Trainer
from toy import EOS, PAD, HotAt, SignalAt, config, copy_task, preference_task, tiny_model, trainer_kwargs

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map

REPO = Path(__file__).resolve().parents[2]
MLX_LAUNCH = Path(sys.executable).with_name("mlx.launch")
LAUNCH_TIMEOUT = 120  # seconds; the run itself takes ~10 s on two slow cores


# ---- sharding, without launching processes --------------------------------------------------------


@pytest.mark.parametrize("size", [1, 2, 3])
@pytest.mark.parametrize("start", [0, 5])
def test_shards_are_disjoint_cover_the_stream_and_start_at_the_global_position(size, start):
    shards = [list(islice(shard(iter(range(100)), rank, size, start=start), 10)) for rank in range(size)]
    # Micro-step j of the ranks together is global batches start + j*size .. start + (j+1)*size - 1.
    interleaved = [shards[rank][j] for j in range(10) for rank in range(size)]
    assert interleaved == list(range(start, start + 10 * size))


def test_resuming_at_a_global_position_continues_every_rank_where_it_was():
    size, accum, steps = 2, 3, 4
    ranks = [shard(iter(range(1000)), rank, size) for rank in range(size)]
    for it in ranks:
        list(islice(it, steps * accum))
    consumed = steps * accum * size  # the trainer's batches_consumed after `steps` steps
    for rank in range(size):
        assert list(islice(ranks[rank], 5)) == list(islice(shard(iter(range(1000)), rank, size, start=consumed), 5))
    # With another world size the same position is still exact: the next micro-step covers the next batches.
    new = [next(shard(iter(range(1000)), rank, 3, start=consumed)) for rank in range(3)]
    assert new == [consumed, consumed + 1, consumed + 2]


def test_packed_batches_are_row_level_so_w_batches_of_b_are_one_batch_of_w_times_b():
    """The property sharding relies on, for the SFT packer: global batch i of size B is rows iB..(i+1)B-1."""
    data = copy_task(23, seed=4)  # a few epochs in 12 batches: packing runs on across epoch boundaries

    def stream(batch_size):
        return iterate_batches(data, batch_size, 24, loop=True, shuffle=True, seed=3, eos_token_id=EOS, pad_token_id=PAD)

    small = [np.concatenate(parts) for parts in zip(*[tuple(map(np.array, b)) for b in islice(stream(2), 24)],
                                                    strict=True)]
    big = [np.concatenate(parts) for parts in zip(*[tuple(map(np.array, b)) for b in islice(stream(6), 8)],
                                                  strict=True)]
    for a, b in zip(small, big, strict=True):
        np.testing.assert_array_equal(a, b)


def test_preference_batches_are_pair_level():
    pairs = preference_task(11, seed=2)

    def flat(batch_size, n):
        out = []
        for b in islice(iterate_orpo_batches(pairs, batch_size, 64, loop=True, seed=1, pad_token_id=PAD), n):
            out += [tuple(row[row != PAD].tolist()) for row in np.array(b.chosen_ids)]
        return out

    assert flat(1, 30) == flat(3, 10)


# ---- the single-process path makes no collective calls ------------------------------------------------


def test_one_process_makes_no_collective_calls(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("collective call in a one-process run")

    for name in ("all_sum", "all_gather", "all_max", "all_min", "send", "recv"):
        monkeypatch.setattr(mx.distributed, name, refuse)
    group = mx.distributed.init()
    assert group.size() == 1
    tree = {"a": mx.ones(3), "b": [mx.zeros((2, 2))]}
    assert all_sum_tree(tree, group) is tree and broadcast_tree(tree, group) is tree
    assert gather_rows([1.0, 2.0], group) == [[1.0, 2.0]]
    check_same({"x": 1}, group)
    cfg = config(tmp_path, max_steps=2, eval_every=1)
    result = Trainer(tiny_model(), cfg, copy_task(20), copy_task(4, seed=1), **trainer_kwargs()).train()
    assert result["step"] == 2 and "val_loss" in result


# ---- two processes ---------------------------------------------------------------------------------

DATA, VAL, TINY_VAL, PAIRS = (40, 0), (7, 1), (1, 2), (12, 3)  # (examples, seed) of copy_task / preference_task


def _config(out: Path, batch_size: int, **kw):
    # config() puts the run in <dir>/run; eval every 2 steps exercises the sharded evaluation.
    values = dict(batch_size=batch_size, grad_accum_steps=2, max_steps=4, warmup_steps=2, eval_every=2, save_every=100)
    return config(out, **{**values, **kw})


def _orpo(out: Path, batch_size: int) -> ORPOTrainer:
    return ORPOTrainer(tiny_model(), _config(out / "orpo", batch_size, max_steps=2, grad_accum_steps=1),
                       preference_task(*PAIRS), **trainer_kwargs())


def worker(root: Path) -> None:
    """One rank of the launched run; writes what the test checks to root/rank{r}.json only."""
    rank = mx.distributed.init().rank()
    report: dict = {"rank": rank}
    data, val = copy_task(*DATA), copy_task(*VAL)
    # Rank 1 gets an empty directory of its own: it must neither need nor write any file.
    out = root if rank == 0 else root / f"rank{rank}"
    out.mkdir(exist_ok=True)

    # Ctrl-C on rank 1 only, before step 3: both ranks must finish step 3 and stop.
    first = Trainer(tiny_model(), _config(out, 1), data, val, cooling_scheduler=SignalAt(3) if rank == 1 else None,
                    **trainer_kwargs()).train()
    report["interrupted"] = {"step": first["step"], "interrupted": first["interrupted"]}
    # Resume with adapters unlike the checkpoint's: every rank must get rank 0's checkpoint.
    model = tiny_model()
    model.update(tree_map(lambda p: p + float(rank + 1), model.trainable_parameters()))
    trainer = Trainer(model, _config(out, 1), data, val, **trainer_kwargs())
    report["resumed_step"] = trainer.train(resume=True)["step"]
    report["adapters_sum"] = sum(float(mx.abs(v).sum().item()) for _, v in tree_flatten(model.trainable_parameters()))
    report["tiny_eval"] = trainer.evaluate(copy_task(*TINY_VAL))  # fewer batches than ranks

    _orpo(out, 1).train()  # preference pairs: metrics other than the loss go through the sums too

    try:  # too hot on rank 1 only, before step 2: both ranks stop, rank 0 saves step 1
        Trainer(tiny_model(), _config(out / "hot", 1), data, cooling_scheduler=HotAt(2) if rank == 1 else None,
                **trainer_kwargs()).train()
        report["thermal"] = "no error"
    except ThermalShutdownError as err:
        report["thermal"] = str(err)

    try:  # a different data file on one machine
        Trainer(tiny_model(), _config(out / "mismatch", 1), copy_task(DATA[0] + rank), **trainer_kwargs()).train()
        report["mismatch"] = "no error"
    except ValueError as err:
        report["mismatch"] = str(err)
    (root / f"rank{rank}.json").write_text(json.dumps(report))


def _free_port_pair() -> int:
    """A port p with p and p + 1 free now: the ring's default 32323 would clash with a concurrent run."""
    for _ in range(20):
        with socket.socket() as a, socket.socket() as b:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            try:
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
            return port
    raise RuntimeError("no two consecutive free TCP ports on 127.0.0.1")


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _adapters(path: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(path)).items()}


def test_two_processes_with_batch_size_one_train_like_one_process_with_batch_size_two(tmp_path):
    root = tmp_path / "two"
    root.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), str(REPO / "src")])}
    command = [str(MLX_LAUNCH), "--backend", "ring", "-n", "2", "--hosts", "127.0.0.1",
               "--starting-port", str(_free_port_pair()), "--", sys.executable, __file__, str(root)]
    # A session of its own, so that a hung run can be killed with every rank it started.
    launched = subprocess.Popen(command, cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True)

    # Meanwhile, the reference: one process, batch size 2, the same data.
    ref_dir = tmp_path / "one"
    reference = Trainer(tiny_model(), _config(ref_dir, 2), copy_task(*DATA), copy_task(*VAL), **trainer_kwargs())
    reference.train()
    ref_tiny_eval = reference.evaluate(copy_task(*TINY_VAL))
    _orpo(ref_dir, 2).train()

    try:
        output, _ = launched.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(launched.pid, signal.SIGKILL)
        output, _ = launched.communicate()
        pytest.fail(f"mlx.launch did not finish in {LAUNCH_TIMEOUT} s:\n{output}")
    # mlx.launch exits 0 even when a rank fails: each rank's report file says that it got to the end.
    missing = [r for r in range(2) if not (root / f"rank{r}.json").exists()]
    assert launched.returncode == 0 and not missing, f"ranks {missing} did not finish:\n{output}"
    reports = [json.loads((root / f"rank{r}.json").read_text()) for r in range(2)]

    # The same adapters as the one-process run with twice the batch size.
    expected = _adapters(ref_dir / "run" / "final_adapter.safetensors")
    got = _adapters(root / "run" / "final_adapter.safetensors")
    assert set(got) == set(expected)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # ... on both ranks (rank 1 never wrote its adapters: compare a checksum).
    assert reports[0]["adapters_sum"] == pytest.approx(reports[1]["adapters_sum"], rel=1e-6)

    # Reported metrics are global ones, written once (by rank 0), each step once despite the restart.
    ref_metrics, metrics = _metrics(ref_dir / "run"), _metrics(root / "run")
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    for m, r in zip(metrics, ref_metrics, strict=True):
        assert m["tokens"] == r["tokens"]
        for key in ("loss", "grad_norm", "val_loss"):
            assert (key in m) == (key in r)
            if key in r:
                assert m[key] == pytest.approx(r[key], rel=1e-4), (m["step"], key)
    ref_orpo, orpo = _metrics(ref_dir / "orpo" / "run"), _metrics(root / "orpo" / "run")
    assert [m["step"] for m in orpo] == [1, 2]
    for m, r in zip(orpo, ref_orpo, strict=True):
        for key in ("loss", "grad_norm", "reward_margin", "reward_accuracy", "chosen_reward"):
            assert m[key] == pytest.approx(r[key], rel=1e-4, abs=1e-6), (m["step"], key)
    expected = _adapters(ref_dir / "orpo" / "run" / "final_adapter.safetensors")
    for k, value in _adapters(root / "orpo" / "run" / "final_adapter.safetensors").items():
        np.testing.assert_allclose(value, expected[k], rtol=1e-4, atol=1e-6, err_msg=k)
    for key, value in ref_tiny_eval.items():
        assert reports[0]["tiny_eval"][key] == pytest.approx(value, rel=1e-5)
        assert reports[1]["tiny_eval"][key] == pytest.approx(value, rel=1e-5)

    # Ctrl-C on rank 1 stopped both ranks after the same step; the resume picked up on both.
    for report in reports:
        assert report["interrupted"] == {"step": 3, "interrupted": True}
        assert report["resumed_step"] == 4
    assert (root / "run" / "step_00000003").is_dir() and (root / "run" / "loss.png").is_file()

    # Thermal stop on rank 1 only: both ranks raised, rank 0 saved the last finished step.
    for report in reports:
        assert "reached the stop threshold 95.0" in report["thermal"] and "at step 2" in report["thermal"]
    assert [p.name for p in (root / "hot" / "run").glob("step_*")] == ["step_00000001"]

    for report in reports:
        assert "disagree" in report["mismatch"] and "rank 0: 40, rank 1: 41" in report["mismatch"]

    # Rank 1 had only an empty directory and wrote nothing into it.
    assert [p for p in (root / "rank1").rglob("*") if p.is_file()] == []


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
