"""ResumableDistributedSampler: Megatron's DP slicing, epochs, shuffling, and exact resumption."""

from itertools import islice

import pytest
import torch

from mindspeed_mm.config.base import ConfigError
from mindspeed_mm.data import ResumableDistributedSampler as Sampler


def take(sampler, n):
    return list(islice(iter(sampler), n))


def test_sequential_dp_slicing_like_megatron():
    # 10 samples, micro-batch 2, DP 2: steps of 4; rank r gets [4k + 2r, 4k + 2r + 2).
    r0 = Sampler(10, 0, 2, 2, num_epochs=1)
    r1 = Sampler(10, 1, 2, 2, num_epochs=1)
    assert list(r0) == [[0, 1], [4, 5]] and list(r1) == [[2, 3], [6, 7]]  # drop_last drops 8, 9
    assert r0.steps_per_epoch == 2 and r0.samples_per_epoch == 8


def test_epochs_continue_and_shards_are_disjoint():
    n, mbs, dp = 13, 2, 3
    ranks = [take(Sampler(n, r, dp, mbs, shuffle=True, seed=7), 6) for r in range(dp)]
    per_epoch = n // (mbs * dp)  # 2 steps
    for epoch in range(3):
        seen = [i for r in ranks for b in r[epoch * per_epoch:(epoch + 1) * per_epoch] for i in b]
        assert len(seen) == len(set(seen)) == 12  # one sample dropped per epoch, none repeated
    expected = torch.randperm(n, generator=torch.Generator().manual_seed(7 + 1))[:12].tolist()
    step1 = [i for k in (2, 3) for r in ranks for i in r[k]]
    assert step1 == expected  # epoch 1 is the permutation of seed + 1, cut into rank slices
    assert ranks[0][0] != ranks[0][2]


@pytest.mark.parametrize("shuffle", [False, True])
@pytest.mark.parametrize("drop_last", [True, False])
def test_resume_is_exact(shuffle, drop_last):
    n, dp, mbs, acc = 11, 2, 3, 2
    gbs = dp * mbs * acc
    for rank in range(dp):
        full = take(Sampler(n, rank, dp, mbs, shuffle=shuffle, seed=3, drop_last=drop_last), 20)
        for steps_done in (1, 3, 4):  # resume after some iterations of acc micro-batches, across epoch ends
            resumed = Sampler(n, rank, dp, mbs, shuffle=shuffle, seed=3, drop_last=drop_last,
                              consumed_samples=steps_done * gbs)
            assert take(resumed, 20 - steps_done * acc) == full[steps_done * acc:]


def test_no_drop_last_completes_the_last_step_for_every_rank():
    batches = [list(Sampler(5, r, 2, 2, drop_last=False, num_epochs=1)) for r in range(2)]
    assert batches == [[[0, 1], [4, 0]], [[2, 3], [1, 2]]]
    assert all(len(b) == 2 for rank in batches for b in rank)


@pytest.mark.parametrize("n, dp, mbs", [(3, 8, 1), (1, 8, 2), (5, 8, 1), (7, 4, 3), (2, 3, 4), (9, 8, 1)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_no_drop_last_small_datasets_fill_every_rank(n, dp, mbs, shuffle):
    # Fewer samples than one step (e.g. 3 DPO pairs at DP 8): the epoch order is repeated until the step is full.
    epochs = 3
    ranks = [list(Sampler(n, r, dp, mbs, shuffle=shuffle, seed=5, drop_last=False, num_epochs=epochs))
             for r in range(dp)]
    steps = -(-n // (dp * mbs))
    assert all(len(batches) == steps * epochs for batches in ranks)  # every rank runs the same micro-batches
    assert all(len(b) == mbs and all(0 <= i < n for i in b) for batches in ranks for b in batches)
    for epoch in range(epochs):
        stream = [i for k in range(steps) for r in range(dp) for i in ranks[r][epoch * steps + k]]
        base = (torch.randperm(n, generator=torch.Generator().manual_seed(5 + epoch)).tolist() if shuffle
                else list(range(n)))
        assert stream == (base * (len(stream) // n + 1))[:len(stream)]  # the order, repeated; every sample seen
    again = [list(Sampler(n, r, dp, mbs, shuffle=shuffle, seed=5, drop_last=False, num_epochs=epochs))
             for r in range(dp)]
    assert again == ranks  # deterministic


def test_three_samples_at_dp_8():
    assert [list(Sampler(3, r, 8, 1, drop_last=False, num_epochs=1)) for r in range(8)] == [
        [[0]], [[1]], [[2]], [[0]], [[1]], [[2]], [[0]], [[1]]]


def test_with_epoch_yields_index_epoch_pairs():
    plain = take(Sampler(5, 1, 2, 2, shuffle=True, seed=1, drop_last=False), 4)
    pairs = take(Sampler(5, 1, 2, 2, shuffle=True, seed=1, drop_last=False, with_epoch=True), 4)
    assert [[i for i, _ in b] for b in pairs] == plain
    assert [[e for _, e in b] for b in pairs] == [[0, 0], [0, 0], [1, 1], [1, 1]]
    resumed = take(Sampler(5, 1, 2, 2, shuffle=True, seed=1, drop_last=False, with_epoch=True, consumed_samples=8), 2)
    assert resumed == pairs[2:]


def test_consumed_samples_not_a_multiple_of_the_step():
    # e.g. the DP size changed on resume: iteration starts mid-stream, slices stay rank-consistent.
    r0 = take(Sampler(8, 0, 2, 1, consumed_samples=3), 3)
    r1 = take(Sampler(8, 1, 2, 1, consumed_samples=3), 3)
    assert r0 == [[3], [5], [7]] and r1 == [[4], [6], [0]]


def test_errors():
    with pytest.raises(ConfigError, match="fewer than one step.*set drop_last false"):
        Sampler(3, 0, 2, 2)
    with pytest.raises(ValueError, match="dp_rank 2 is not in"):
        Sampler(10, 2, 2, 1)
    with pytest.raises(ValueError, match="empty"):
        Sampler(0, 0, 1, 1)
    with pytest.raises(ValueError, match="consumed_samples"):
        Sampler(4, 0, 1, 1, consumed_samples=-1)
    assert list(Sampler(3, 0, 2, 2, drop_last=False, num_epochs=1)) == [[0, 1]]
