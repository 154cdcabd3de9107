"""The compute floor: a bare single-process PyTorch loop of the seed's model on the same data.

No Ray, no memory maps, no framework: the whole training split as one float tensor, a
permutation per epoch, slices of `batch_size`, RMSprop with Keras' defaults. Every benchmark
states its results as a ratio to this loop measured in the same run.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from torch import nn


def bare_loop(processed_dir: Path, *, epochs: int = 3, batch_size: int = 128,
              hidden: int = 512, threads: int = 2, seed: int = 0, device: str = "cpu") -> dict:
    """On a GPU (device="cuda") the whole split lives on the device, as the train stage's does,
    and each epoch ends with a synchronize so that its time is the device's."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    x = torch.from_numpy(np.load(processed_dir / "train_images.npy")).reshape(-1, 784).float()
    x /= 255.0
    y = torch.from_numpy(np.load(processed_dir / "train_labels.npy")).long()
    x, y = x.to(device), y.to(device)
    model = nn.Sequential(nn.Linear(784, hidden), nn.ReLU(), nn.Linear(hidden, 10)).to(device)
    opt = torch.optim.RMSprop(model.parameters(), lr=1e-3, alpha=0.9, eps=1e-7)
    loss_fn = nn.CrossEntropyLoss()
    times = []
    for _ in range(epochs):
        started = time.perf_counter()
        perm = torch.randperm(len(y), device=device)
        for i in range(0, len(y), batch_size):
            idx = perm[i:i + batch_size]
            opt.zero_grad()
            loss = loss_fn(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    median = sorted(times)[len(times) // 2]
    return {"epoch_times_s": times, "epoch_s": median, "samples_per_s": len(y) / median,
            "n": len(y)}
