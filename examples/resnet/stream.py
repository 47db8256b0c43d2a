"""Training batches addressed by step number, so that a run resumed at step ``i`` sees exactly the batches it would
have seen, and two runs of the same seed share their first batches (a short sweep run and the long run that branches
from the same point).

Batch ``i`` depends only on ``(seed, i)``: epoch ``i // steps_per_epoch`` shuffles the split with a generator seeded by
``(seed, epoch)``, and the augmentation of the batch (random crop of the 4-px zero-padded image, horizontal flip) uses a
generator seeded by ``(seed, i)``. The split is moved to ``device`` once as uint8 and every batch is cut, augmented and
normalised there, so on a GPU the input pipeline never touches the host.
"""
from __future__ import annotations

import torch

from .data import Split, augment, to_float

_EPOCH_SALT = 1_000_003
_STEP_SALT = 7_919


class StepStream:
    """Augmented, normalised training batches: ``stream.batch(i)`` is batch number ``i`` (``drop_last`` epochs)."""

    def __init__(self, split: Split, batch_size: int, seed: int, device: str | torch.device = "cpu",
                 channels_last: bool = False) -> None:
        if not 1 <= batch_size <= len(split):
            raise ValueError(f"batch size {batch_size} must be between 1 and the training set size ({len(split)})")
        self.device = torch.device(device)
        self.x = split.x.to(self.device)
        self.y = split.y.to(self.device)
        self.batch_size = batch_size
        self.seed = int(seed)
        self.channels_last = channels_last
        self.steps_per_epoch = len(split) // batch_size
        self._epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _generator(self, salt: int) -> torch.Generator:
        return torch.Generator(device=self.device).manual_seed((self.seed * _EPOCH_SALT + salt) % (2**63 - 1))

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Batch ``step`` as ``(images, labels)`` on the stream's device."""
        epoch, i = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._perm = torch.randperm(len(self.y), generator=self._generator(epoch), device=self.device)
            self._epoch = epoch
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        xb = augment(self.x[idx], generator=self._generator(-_STEP_SALT * (step + 1)))
        return to_float(xb, channels_last=self.channels_last), self.y[idx]


def carve(split: Split, n_val: int, seed: int) -> tuple[Split, Split]:
    """Split off a class-stratified validation set of ``n_val`` images: ``(train, val)``, disjoint, seeded."""
    if not 0 < n_val < len(split):
        raise ValueError(f"validation size must be between 1 and {len(split) - 1}, got {n_val}")
    g = torch.Generator().manual_seed(seed)
    classes = torch.unique(split.y)
    per_class = [torch.nonzero(split.y == c).flatten() for c in classes]
    quota = [n_val * len(ix) / len(split) for ix in per_class]
    take = [int(q) for q in quota]  # largest remainders get the images left over
    for j in sorted(range(len(quota)), key=lambda j: take[j] - quota[j])[:n_val - sum(take)]:
        take[j] += 1
    val_idx, train_idx = [], []
    for ix, k in zip(per_class, take):
        ix = ix[torch.randperm(len(ix), generator=g)]
        val_idx.append(ix[:k])
        train_idx.append(ix[k:])
    vi, ti = torch.cat(val_idx).sort().values, torch.cat(train_idx).sort().values
    return Split(split.x[ti], split.y[ti], split.note), Split(split.x[vi], split.y[vi], split.note)
