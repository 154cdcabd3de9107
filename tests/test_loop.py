"""The per-worker loop, run in-process without Ray."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from dltrain.loop import (
    LoopConfig,
    LoopState,
    load_state,
    make_optimizer,
    save_state,
    shard_indices,
    train_loop,
)
from dltrain.model import MLP


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


def test_restoring_a_checkpoint_continues_exactly(processed_ws: Path, tmp_path: Path) -> None:
    """2 epochs, a checkpoint on disk, 2 more == 4 epochs straight: resume mixes nothing."""
    straight = train_loop(config(processed_ws, epochs=4))
    first = train_loop(config(processed_ws, epochs=2))
    save_state(first, tmp_path)
    restored = load_state(tmp_path)
    assert restored.next_epoch == 3
    resumed = train_loop(config(processed_ws, epochs=4), restored=restored)
    assert [e["epoch"] for e in resumed.history] == [1, 2, 3, 4]
    assert [e["attempt"] for e in resumed.history] == [0, 0, 1, 1]
    for key in straight.model:
        torch.testing.assert_close(resumed.model[key], straight.model[key])


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
    # weights_only loading succeeds: nothing in a checkpoint needs unpickling of code.
    loaded = torch.load(tmp_path / "state.pt", weights_only=True)
    assert isinstance(loaded["model"]["net.0.weight"], torch.Tensor)
    assert isinstance(load_state(tmp_path), LoopState)


def test_the_best_validation_epoch_is_kept(processed_ws: Path) -> None:
    state = train_loop(config(processed_ws, epochs=3, learning_rate=3e-3))
    best = max(state.history, key=lambda e: e["val_accuracy"])
    assert state.best_epoch == best["epoch"]
    # Oracle: the same run stopped at the best epoch has exactly those weights.
    stopped = train_loop(config(processed_ws, epochs=best["epoch"], learning_rate=3e-3))
    for key in stopped.model:
        torch.testing.assert_close(state.best_model[key], stopped.model[key])
