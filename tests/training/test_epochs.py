import math

from bit_axon.training.collate import iterate_batches
from bit_axon.training.config import SettingError
from bit_axon.training.epochs import packed_batches_per_epoch, pair_batches_per_epoch, steps_for_epochs
from bit_axon.training.orpo_trainer import ORPOTrainer
from bit_axon.training.trainer import Trainer
from toy import EOS, PAD, config, copy_task, preference_task, tiny_model, trainer_kwargs

import pytest


@pytest.mark.parametrize(("n", "seed"), [(30, 0), (60, 2), (200, 2), (200, 4)])
def test_a_pass_counts_the_batches_of_epoch_zeros_order(n, seed):
    data = copy_task(n)
    measured = sum(1 for _ in iterate_batches(data, 2, 24, loop=False, shuffle=True, seed=seed,
                                              eos_token_id=EOS, pad_token_id=PAD))
    assert packed_batches_per_epoch(data, 2, 24, seed, EOS, PAD) == measured


def test_the_order_changes_how_many_batches_a_pass_packs_to():
    # Why the count uses the seed's shuffle: the file's order packs to one batch less here.
    data = copy_task(200)
    in_order = sum(1 for _ in iterate_batches(data, 2, 24, shuffle=False, eos_token_id=EOS, pad_token_id=PAD))
    assert in_order != packed_batches_per_epoch(data, 2, 24, 2, EOS, PAD)


def test_steps_for_epochs_round_up():
    assert steps_for_epochs(40, 2, 1, 1) == 20
    assert steps_for_epochs(41, 2, 1, 1) == 21
    assert steps_for_epochs(41, 2, 2, 3) == math.ceil(123 / 4) == 31
    assert pair_batches_per_epoch(9, 2) == 5


def test_one_epoch_is_one_pass_and_every_record_says_which_epoch(tmp_path, capsys):
    data = copy_task(30)
    trainer = Trainer(tiny_model(), config(tmp_path, epochs=1), data, **trainer_kwargs())
    per_epoch = packed_batches_per_epoch(data, 2, 24, trainer.config.seed, EOS, PAD)
    steps = steps_for_epochs(per_epoch, 2, 1, 1)
    assert trainer.batches_per_epoch == per_epoch
    assert trainer.config.max_steps == steps and trainer.config.epochs == 1
    assert f"epochs=1: {per_epoch} batches per epoch -> {steps} steps" in capsys.readouterr().out
    result = trainer.train()
    assert result["step"] == steps
    # The whole pass, and less than one step more.
    assert per_epoch <= trainer.batches_consumed < per_epoch + trainer.config.grad_accum_steps
    assert [r["epoch"] for r in trainer.history] == [2 * (i + 1) / per_epoch for i in range(steps)]
    # The resolved number is what the checkpoint records (a resume sees the same run length).
    assert result["checkpoint"].endswith(f"step_{steps:08d}")


def test_epochs_resolve_for_orpo_pairs(tmp_path):
    pairs = preference_task(9)
    trainer = ORPOTrainer(tiny_model(), config(tmp_path, training_mode="orpo", max_seq_len=32, epochs=2), pairs,
                          **trainer_kwargs())
    assert trainer.batches_per_epoch == 5 and trainer.config.max_steps == 5  # 10 batches, 2 per step


def test_an_explicit_warmup_longer_than_the_epochs_is_refused_naming_epochs(tmp_path):
    with pytest.raises(SettingError, match=r"warmup_steps must be between 0 and max_steps \(4\).*epochs=1 makes 4 steps"):
        Trainer(tiny_model(), config(tmp_path, epochs=1, warmup_steps=50, max_steps=10_000), copy_task(30),
                **trainer_kwargs())


def test_the_default_warmup_is_cut_to_the_epochs_steps(tmp_path):
    trainer = Trainer(tiny_model(), config(tmp_path, epochs=1, warmup_steps=100, max_steps=10_000), copy_task(30),
                      **trainer_kwargs())
    assert trainer.config.max_steps == trainer.config.warmup_steps == 4
