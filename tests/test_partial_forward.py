"""forward_until: statistics forwards stop after the last observed layer, having run every
observed call (a module called twice included)."""

import torch
from torch import fx, nn

from fxquant.partial_forward import forward_until


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 1)

    def forward(self, x):
        return self.head(self.b(self.a(self.b(x))))  # b runs twice, the head last


def test_forward_stops_after_the_last_observed_call_and_runs_all_of_them():
    gm = fx.symbolic_trace(Net())
    head_calls = []
    gm.head.register_forward_pre_hook(lambda m, args: head_calls.append(1))
    seen = []
    handles = [gm.get_submodule(n).register_forward_pre_hook(lambda m, args, n=n: seen.append(n)) for n in ("a", "b")]
    with forward_until(gm, ["a", "b"]) as run:
        assert run(torch.randn(2, 4)) is None
        run(torch.randn(2, 4))
    assert seen == ["b", "a", "b"] * 2
    assert not head_calls
    with forward_until(gm, ["a"]) as run:  # a is followed by b and the head: they are skipped
        run(torch.randn(2, 4))
    assert seen[-2:] == ["b", "a"] and not head_calls
    for h in handles:
        h.remove()
    gm(torch.randn(2, 4))  # the stopping hook is gone
    assert len(head_calls) == 1
    with forward_until(gm, ["nothing"]) as run:  # no observed call: the whole forward
        run(torch.randn(2, 4))
    assert len(head_calls) == 2
