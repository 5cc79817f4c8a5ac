"""Per-class and global sample queues."""
import pytest
import torch

from drift_policy.image.queues import ClassQueues, RingQueue


def test_ring_queue_is_fifo_and_keeps_the_newest():
    q = RingQueue(5, (1,))
    q.push(torch.arange(3.0).view(3, 1))
    assert q.size == 3 and q.items().flatten().tolist() == [0, 1, 2]
    q.push(torch.arange(3.0, 7.0).view(4, 1))             # wraps around: 0 and 1 fall out
    assert q.size == 5 and q.items().flatten().tolist() == [2, 3, 4, 5, 6]
    q.push(torch.arange(10.0, 18.0).view(8, 1))           # more than capacity at once
    assert q.items().flatten().tolist() == [13, 14, 15, 16, 17]


def test_sampling_without_replacement_when_possible():
    q = RingQueue(10, (1,))
    q.push(torch.arange(10.0).view(10, 1))
    s = q.sample(10, torch.Generator().manual_seed(0)).flatten()
    assert sorted(s.tolist()) == list(range(10))
    big = q.sample(25, torch.Generator().manual_seed(0))  # with replacement only when asked for more
    assert big.shape == (25, 1) and set(big.flatten().tolist()) <= set(range(10))
    with pytest.raises(RuntimeError, match="empty"):
        RingQueue(3, (1,)).sample(1)


def test_class_queues_route_by_label_and_feed_the_global_queue():
    qs = ClassQueues(3, per_class=4, global_size=6, item_shape=(2,))
    assert not qs.ready(1)
    y = torch.tensor([0, 1, 2, 0, 1, 2, 0, 0, 0])
    x = torch.stack([y.float(), torch.arange(9.0)], 1)   # x[:, 0] = label, x[:, 1] = arrival order
    qs.push(x, y)
    assert qs.ready(2) and not qs.ready(3)
    pos = qs.positives(torch.tensor([2, 0, 1]), 2, torch.Generator().manual_seed(0))
    assert pos.shape == (3, 2, 2)
    assert (pos[0, :, 0] == 2).all() and (pos[1, :, 0] == 0).all() and (pos[2, :, 0] == 1).all()
    # class 0 saw 5 items but keeps the 4 most recent
    assert qs.cls[0].items()[:, 1].tolist() == [3, 6, 7, 8]
    # the global queue holds the 6 most recent items of any class
    assert qs.glob.items()[:, 1].tolist() == [3, 4, 5, 6, 7, 8]
    assert qs.unconditional(6).shape == (6, 2)


def test_queue_state_round_trip_draws_the_same():
    g = torch.Generator().manual_seed(0)
    q = ClassQueues(3, 4, 6, (2,), dtype=torch.float16)
    for _ in range(3):
        q.push(torch.randn(5, 2, generator=g), torch.randint(0, 3, (5,), generator=g))
    r = ClassQueues(3, 4, 6, (2,), dtype=torch.float16)
    r.load_state_dict(q.state_dict())
    q.push(torch.ones(2, 2), torch.tensor([0, 1]))                  # both continue identically
    r.push(torch.ones(2, 2), torch.tensor([0, 1]))
    g1, g2 = (torch.Generator().manual_seed(1) for _ in range(2))
    assert torch.equal(q.positives(torch.tensor([0, 2]), 3, g1), r.positives(torch.tensor([0, 2]), 3, g2))
    assert torch.equal(q.unconditional(4, g1), r.unconditional(4, g2))
    with pytest.raises(ValueError, match="does not fit"):
        ClassQueues(3, 5, 6, (2,), dtype=torch.float16).load_state_dict(q.state_dict())
