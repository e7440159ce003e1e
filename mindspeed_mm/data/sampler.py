"""A resumable, data-parallel batch sampler (Megatron's MegatronPretrainingSampler semantics, over epochs).

The samples of all DP ranks form one global stream, epoch after epoch. Epoch e visits the dataset in order
(`shuffle=False`) or in the permutation `torch.randperm(n, generator=manual_seed(seed + e))` (`shuffle=True`); every
rank computes the same order. The stream is cut into steps of `micro_batch_size * dp_size` samples, and rank r takes the
slice `[r * micro_batch_size, (r + 1) * micro_batch_size)` of each step, exactly as Megatron does.

`consumed_samples` counts samples of the global stream already used (Megatron's `args.consumed_samples`, which the
training loop advances by the global batch size each iteration). Iteration starts right after it, so a resumed run sees
exactly the micro-batches the interrupted run would have seen next.

At the end of an epoch, `drop_last=True` drops the final partial step (`n // step` steps per epoch). `drop_last=False`
completes it by repeating that epoch's order from its start, as many times as needed (a dataset smaller than one step
is repeated whole), so every DP rank runs the same number of full micro-batches (Megatron instead hands some ranks a
short or empty micro-batch, which stalls the collectives).

With `with_epoch=True` the sampler yields `(index, epoch)` pairs instead of indices. The DataLoader hands them to
`dataset[...]` inside its workers, so a dataset whose samples depend on the epoch (caption lists) sees the right epoch
even in worker processes, where a `set_epoch` call in the main process would never arrive.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Tuple, Union

import torch
from torch.utils.data import DataLoader, Dataset

from ..config.base import ConfigError


class ResumableDistributedSampler:
    """Yields this DP rank's micro-batches (lists of dataset indices), resuming after `consumed_samples`.

    Use it as a DataLoader's `batch_sampler`. Iteration is endless unless `num_epochs` is given; each `iter()` starts
    again at `consumed_samples` (the sampler does not count what it yields: DataLoader workers prefetch ahead).
    With `with_epoch`, a micro-batch is a list of `(index, epoch)` pairs (see the module docstring).
    """

    def __init__(self, dataset_len: int, dp_rank: int, dp_size: int, micro_batch_size: int, shuffle: bool = False,
                 seed: int = 0, drop_last: bool = True, consumed_samples: int = 0, num_epochs: Optional[int] = None,
                 with_epoch: bool = False):
        if dataset_len <= 0:
            raise ValueError(f"the dataset is empty (dataset_len={dataset_len}).")
        if dp_size <= 0 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is not in [0, dp_size={dp_size}).")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be positive, got {micro_batch_size}.")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples must be non-negative, got {consumed_samples}.")
        self.step = micro_batch_size * dp_size
        if drop_last and dataset_len < self.step:
            raise ConfigError(f"the dataset has {dataset_len} samples, fewer than one step of micro_batch_size "
                              f"{micro_batch_size} x data-parallel size {dp_size} = {self.step}; with "
                              f"dataloader_param.drop_last true nothing would be trained. Add samples, lower the "
                              f"batch size, or set drop_last false (the samples are then repeated to fill a step).")
        self.dataset_len = dataset_len
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.micro_batch_size = micro_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.consumed_samples = consumed_samples
        self.num_epochs = num_epochs
        self.with_epoch = with_epoch

    @property
    def steps_per_epoch(self) -> int:
        """Micro-batches per epoch for each rank (= global steps of micro_batch_size x dp_size samples)."""
        full, rest = divmod(self.dataset_len, self.step)
        return full + (1 if rest and not self.drop_last else 0)

    @property
    def samples_per_epoch(self) -> int:
        """Samples of the global stream per epoch (a multiple of micro_batch_size x dp_size)."""
        return self.steps_per_epoch * self.step

    @property
    def epoch(self) -> int:
        """The epoch that `consumed_samples` falls in."""
        return self.consumed_samples // self.samples_per_epoch

    def epoch_order(self, epoch: int) -> torch.Tensor:
        """The dataset order of `epoch`, completed to `samples_per_epoch` (or cut to it with drop_last)."""
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        size = self.samples_per_epoch
        if size > self.dataset_len:  # drop_last=False: repeat the order until the last step is full
            order = order.repeat(-(-size // self.dataset_len))
        return order[:size]

    def __iter__(self) -> Iterator[List[Union[int, Tuple[int, int]]]]:
        per_epoch = self.samples_per_epoch
        end = None if self.num_epochs is None else self.num_epochs * per_epoch
        orders = {}

        def position(p: int):
            epoch, offset = divmod(p, per_epoch)
            if epoch not in orders:
                if len(orders) > 1:
                    orders.pop(min(orders))
                orders[epoch] = self.epoch_order(epoch).tolist()
            return (orders[epoch][offset], epoch) if self.with_epoch else orders[epoch][offset]

        # Step k covers stream positions [consumed + k * step, consumed + (k + 1) * step). When consumed_samples is a
        # multiple of the step (always, unless the batch size or DP size changed on resume) steps never straddle epochs.
        start = self.consumed_samples + self.dp_rank * self.micro_batch_size
        while end is None or start - self.dp_rank * self.micro_batch_size + self.step <= end:
            yield [position(p) for p in range(start, start + self.micro_batch_size)]
            start += self.step


def _accelerator_available() -> bool:
    accelerator = getattr(torch, "accelerator", None)
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def build_dataloader(dataset: Dataset, data_config, dp_rank: int, dp_size: int, micro_batch_size: int,
                     consumed_samples: int = 0, seed: int = 0, num_workers: int = 0,
                     num_epochs: Optional[int] = None) -> DataLoader:
    """A DataLoader over `dataset` with the `dataloader_param` of an `MMDataConfig`: `ResumableDistributedSampler`
    (shuffled when `shuffle` is true or `sampler_type` is "RandomSampler") and `collate`.

    The sampler yields `(index, epoch)` pairs, which the project's datasets accept, so per-epoch choices (caption
    lists) follow the epoch in every DataLoader worker."""
    from .datasets import collate

    param = data_config.dataloader_param
    sampler = ResumableDistributedSampler(len(dataset), dp_rank, dp_size, micro_batch_size,
                                          shuffle=param.shuffle or param.sampler_type == "RandomSampler", seed=seed,
                                          drop_last=param.drop_last, consumed_samples=consumed_samples,
                                          num_epochs=num_epochs, with_epoch=True)
    return DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=num_workers,
                      pin_memory=param.pin_memory and _accelerator_available(),
                      persistent_workers=num_workers > 0)
