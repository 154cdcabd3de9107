"""Stock Ray Train: the same loop as the train stage, in the shape Ray's documentation shows,
with none of dltrain's Ray set-up (no runtime env, no quiet settings, no warm Ray).

    python bench/stock_ray_train.py PROCESSED_DIR OUT_JSON [--epochs 3] [--workers 1]

Run in a process of its own, timed from outside by bench/train_throughput.py: TorchTrainer
starts its own local Ray (ray.init() inside fit()), and each worker reports every epoch with a
checkpoint, as in Ray Train's PyTorch guide. Writes the per-epoch records to OUT_JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from dataclasses import asdict
from pathlib import Path

import ray.train
import torch
from ray.train.torch import TorchTrainer, prepare_model

from dltrain.train.loop import LoopConfig, train_loop


def train_func(config: dict) -> None:
    cfg = LoopConfig(**config)
    world = ray.train.get_context().get_world_size()
    rank = ray.train.get_context().get_world_rank()

    def allreduce(t: torch.Tensor) -> torch.Tensor:
        if world > 1:
            torch.distributed.all_reduce(t)
        return t

    def on_epoch_end(record, snapshot) -> None:
        with tempfile.TemporaryDirectory() as directory:
            torch.save(snapshot().model, Path(directory) / "model.pt")
            ray.train.report(asdict(record),
                             checkpoint=ray.train.Checkpoint.from_directory(directory))

    train_loop(cfg, rank=rank, world_size=world, wrap_model=prepare_model, allreduce=allreduce,
               on_epoch_end=on_epoch_end)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("processed_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()
    cfg = LoopConfig(processed_dir=str(args.processed_dir.resolve()), hidden_sizes=(512,),
                     epochs=args.epochs, batch_size=128, learning_rate=1e-3,
                     optimizer="rmsprop", seed=42, threads=2 // args.workers or 1,
                     ema_decay=0.99)
    with tempfile.TemporaryDirectory() as storage:
        trainer = TorchTrainer(
            train_func, train_loop_config=asdict(cfg),
            scaling_config=ray.train.ScalingConfig(num_workers=args.workers),
            run_config=ray.train.RunConfig(storage_path=storage))
        result = trainer.fit()
        # One row per reported checkpoint: every epoch (CheckpointConfig keeps all by default).
        history = result.metrics_dataframe.to_dict("records")
    args.out.write_text(json.dumps({"epochs": history}))


if __name__ == "__main__":
    main()
