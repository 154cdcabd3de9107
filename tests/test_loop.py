"""The per-worker loop, run in-process without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dltrain.model.mlp import MLP
from dltrain.train.loop import (
    CHECKPOINT_MODEL,
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_STATE,
    LoopConfig,
    LoopState,
    load_state,
    make_optimizer,
    save_state,
    shard_indices,
    train_loop,
)


def config(ws: Path, **overrides) -> LoopConfig:
    values = dict(processed_dir=str(ws / "data" / "processed"), hidden_sizes=(64,), epochs=3,
                  batch_size=32, learning_rate=1e-3, optimizer="rmsprop", seed=0, threads=1)
    values.update(overrides)
    return LoopConfig(**values)


def test_loss_falls_and_accuracy_is_reached(processed_ws: Path) -> None:
    records = []
    state = train_loop(config(processed_ws), on_epoch_end=lambda r, snap: records.append(r))
    assert [r.epoch for r in records] == [1, 2, 3]
    assert records[-1].train_loss < records[0].train_loss
    assert records[-1].val_accuracy >= 0.9
    assert records[0].samples == 540  # 600 * 0.9 training samples, one worker
    assert set(state.model) == set(MLP((64,)).state_dict())


def test_same_seed_same_weights_other_seed_other_weights(processed_ws: Path) -> None:
    a = train_loop(config(processed_ws, epochs=1))
    b = train_loop(config(processed_ws, epochs=1))
    c = train_loop(config(processed_ws, epochs=1, seed=1))
    assert all(torch.equal(a.model[k], b.model[k]) for k in a.model)
    assert not all(torch.equal(a.model[k], c.model[k]) for k in a.model)


@pytest.mark.parametrize("ema_decay", [0.0, 0.9])
def test_restoring_a_checkpoint_continues_exactly(processed_ws: Path, tmp_path: Path,
                                                  ema_decay: float) -> None:
    """2 epochs, a checkpoint on disk, 2 more == 4 epochs straight: resume mixes nothing."""
    straight = train_loop(config(processed_ws, epochs=4, ema_decay=ema_decay))
    first = train_loop(config(processed_ws, epochs=2, ema_decay=ema_decay))
    save_state(first, tmp_path)
    restored = load_state(tmp_path)
    assert restored.next_epoch == 3
    resumed = train_loop(config(processed_ws, epochs=4, ema_decay=ema_decay), restored=restored)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3, 4]
    assert [e["attempt"] for e in resumed.history] == [0, 0, 1, 1]
    for key in straight.model:
        torch.testing.assert_close(resumed.model[key], straight.model[key])
        torch.testing.assert_close(resumed.best_model[key], straight.best_model[key])
    if ema_decay:
        assert resumed.ema_steps == straight.ema_steps > 0
        for key in straight.ema:
            torch.testing.assert_close(resumed.ema[key], straight.ema[key])


def test_weight_average_is_the_exponential_average_of_the_steps() -> None:
    """Oracle: after step t, avg <- d * avg + (1 - d) * weights, d = min(decay, (1+t)/(10+t))."""
    from dltrain.train.loop import WeightAverage

    torch.manual_seed(0)
    model = MLP((4,))
    average = WeightAverage(model, decay=0.75)
    expected = [p.detach().clone() for p in model.parameters()]
    for t in range(1, 41):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        average.update()
        d = min(0.75, (1 + t) / (10 + t))
        expected = [d * e + (1 - d) * p.detach()
                    for e, p in zip(expected, model.parameters(), strict=True)]
    for e, a in zip(expected, average.model.parameters(), strict=True):
        torch.testing.assert_close(a, e)
    assert not any(p.requires_grad for p in average.model.parameters())


def test_averaged_weights_are_validated_and_shipped(processed_ws: Path) -> None:
    state = train_loop(config(processed_ws, epochs=3, ema_decay=0.9))
    # Oracle: the shipped weights are the average as it stood at the best epoch.
    stopped = train_loop(config(processed_ws, epochs=state.best_epoch, ema_decay=0.9))
    for key in stopped.ema:
        torch.testing.assert_close(state.best_model[key], stopped.ema[key])
    assert not torch.equal(stopped.ema["net.0.weight"], stopped.model["net.0.weight"])
    assert state.history[-1]["val_accuracy"] >= 0.9


@pytest.mark.parametrize("n,world", [(540, 1), (540, 2), (541, 2), (100, 3)])
def test_shards_are_disjoint_equal_and_cover_all_but_a_remainder(n: int, world: int) -> None:
    shards = [shard_indices(n, r, world, seed=0, epoch=1) for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    joined = np.concatenate(shards)
    assert len(np.unique(joined)) == len(joined) == n - n % world
    assert not np.array_equal(shard_indices(n, 0, world, 0, 1), shard_indices(n, 0, world, 0, 2))


def test_rmsprop_uses_keras_defaults() -> None:
    opt = make_optimizer("rmsprop", MLP((8,)).parameters(), 1e-3)
    group = opt.param_groups[0]
    assert (group["lr"], group["alpha"], group["eps"]) == (1e-3, 0.9, 1e-7)


def test_global_batch_must_split_across_workers(processed_ws: Path) -> None:
    with pytest.raises(ValueError, match="does not split across 3 workers"):
        train_loop(config(processed_ws, batch_size=32), world_size=3)


def test_checkpoint_is_plain_tensors(processed_ws: Path, tmp_path: Path) -> None:
    save_state(train_loop(config(processed_ws, epochs=1)), tmp_path)
    # The tensors are safetensors; the optimizer's state loads with weights_only: nothing in
    # a checkpoint needs unpickling of code.
    from safetensors.torch import load_file

    assert isinstance(load_file(tmp_path / CHECKPOINT_STATE)["model/net.0.weight"], torch.Tensor)
    assert "param_groups" in torch.load(tmp_path / CHECKPOINT_OPTIMIZER, weights_only=True)
    assert load_file(tmp_path / CHECKPOINT_MODEL).keys() == {
        "net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"}
    assert isinstance(load_state(tmp_path), LoopState)


def test_the_best_validation_epoch_is_kept(processed_ws: Path) -> None:
    state = train_loop(config(processed_ws, epochs=3, learning_rate=3e-3))
    best = max(state.history, key=lambda e: e["val_accuracy"])
    assert state.best_epoch == best["epoch"]
    # Oracle: the same run stopped at the best epoch has exactly those weights.
    stopped = train_loop(config(processed_ws, epochs=best["epoch"], learning_rate=3e-3))
    for key in stopped.model:
        torch.testing.assert_close(state.best_model[key], stopped.model[key])


def test_a_diverging_run_stops_at_the_first_non_finite_loss(processed_ws: Path) -> None:
    """learning_rate 1e30 makes the loss inf/nan in the first epoch: the loop raises the
    certain failure there (no epoch reported), naming the key to change."""
    from dltrain.errors import CertainTrainingError

    records = []
    with pytest.raises(CertainTrainingError, match=r"not finite at epoch 1 .*train.learning_rate"):
        train_loop(config(processed_ws, learning_rate=1e30, optimizer="sgd"),
                   on_epoch_end=lambda r, snap: records.append(r))
    assert records == []


def test_a_run_that_diverges_later_keeps_the_epochs_before(processed_ws: Path) -> None:
    """A restored run whose next epoch diverges: the epochs before were reported, the failing
    one is not, and the message names the checkpoint that is kept."""
    from dltrain.errors import CertainTrainingError

    records = []
    state = train_loop(config(processed_ws, epochs=1), on_epoch_end=lambda r, s: records.append(r))
    with torch.no_grad():
        for tensor in state.model.values():
            tensor.fill_(float("nan"))
    with pytest.raises(CertainTrainingError, match="epoch 2 .*checkpoint of epoch 1 is kept"):
        train_loop(config(processed_ws, epochs=2), restored=state,
                   on_epoch_end=lambda r, s: records.append(r))
    assert [r.epoch for r in records] == [1]
