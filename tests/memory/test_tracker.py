"""Tests of revseg.memory.tracker: the one storage ledger under the meter and the planner."""

import torch

from revseg.memory.tracker import StorageTracker, tensors_in, unique_storages

N = 10_000


class Events(StorageTracker):
    def __init__(self) -> None:
        super().__init__("cpu")
        self.events: list[tuple] = []
        self.ops = 0

    def born(self, uid, nbytes, found):
        self.events.append(("found" if found else "born", uid, nbytes))

    def resized(self, uid, delta):
        self.events.append(("resized", uid, delta))

    def freed(self, uid, nbytes):
        self.events.append(("freed", uid, nbytes))

    def op_done(self):
        self.ops += 1


def test_walker_finds_tensors_in_any_nesting():
    a, b, c = torch.zeros(1), torch.zeros(2), torch.zeros(3)
    found = tensors_in([a, {"x": (b, 3, "s")}, iter([c]), None])
    assert [t is u for t, u in zip(found, (a, b, c))] == [True] * 3 and len(found) == 3
    assert len(unique_storages([a, a[:0], a.view(1)])) == 1


def test_births_resizes_frees_and_found_storages_in_order():
    old = torch.zeros(N)
    tracker = Events()
    with tracker:
        x = torch.empty(N)  # born
        y = x.view(-1) + old  # x known, `old` found, y born
        x.resize_(2 * N)
        del x, y
        torch.empty(1)  # an op: the frees before it are accounted first
    tracker.close()
    assert tracker.events == [
        ("born", 0, 4 * N),
        ("found", 1, 4 * N),
        ("born", 2, 4 * N),
        ("resized", 0, 4 * N),
        ("freed", 0, 8 * N),
        ("freed", 2, 4 * N),
        ("born", 3, 4),
        ("freed", 3, 4),
    ]
    assert tracker.ops == 5


def test_lifted_tensors_are_born_and_uids_are_stable():
    tracker = Events()
    p = torch.zeros(4)
    tracker.add([p, p[1:]])
    with tracker:
        t = torch.tensor([1.0, 2.0])
    assert tracker.events[0] == ("found", 0, 16)
    assert ("found", 1, 8) not in tracker.events and ("born", 1, 8) in tracker.events
    assert tracker.uid_of(p[2:]) == 0 and tracker.uid_of(t) is not None
    assert tracker.see(p) == 0 and tracker.uid_of(torch.zeros(1)) is None
    tracker.close()
    assert tracker.uid_of(p) is None
