"""Layer-major runs: each node on every sample before the next, and the passes built on them."""

from __future__ import annotations

import torch

import fxquant
from fxquant.layer_major import run_layer_major
from fxquant.passes import AWQScale, PassManager, ResolveSchemes
from fxquant.passes.smooth_quant import input_stats
from fxquant.schemes import SchemeOptions

from test_smooth_quant import Block, _data


def _hooked(gm, names):
    """Pre-hooks on the modules `names` recording (name, input) in call order."""
    calls = []
    handles = [gm.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: calls.append((n, a[0].clone())))
               for n in names]
    return calls, handles


def test_each_node_runs_on_every_sample_before_the_next_with_the_forwards_inputs():
    data = _data(3)
    gm = fxquant.capture(Block().eval(), (data[0][0],))
    names = ["q", "gate", "down"]
    calls, handles = _hooked(gm, names)
    with torch.no_grad():
        for (x,) in data:
            gm(x)
    forward = calls[:]
    calls.clear()
    seen = []
    run_layer_major(gm, [((x,), {}) for (x,) in data], names, after_node=seen.append)
    for h in handles:
        h.remove()
    assert [n for n, _ in calls] == ["q"] * 3 + ["gate"] * 3 + ["down"] * 3
    by_sample = {n: [t for m, t in forward if m == n] for n in names}  # forward order: sample-major
    for i, (n, t) in enumerate(calls):
        assert torch.equal(t, by_sample[n][i % 3]), (n, i)
    assert "head" not in {n.target for n in seen}  # nothing after the last target runs


def test_input_stats_layer_major_equals_the_forward_and_completes_layers_in_order():
    data = _data(4)
    gm = fxquant.capture(Block().eval(), (data[0][0],))
    targets = ["q", "k", "gate", "up", "down"]
    rows_of, max_rows = ["q", "gate", "down"], 24
    sample_major = input_stats(gm, data, targets, rows_of, max_rows)
    calls, handles = _hooked(gm, targets)
    completed = []

    def when_complete(name, stats):
        assert stats[name].rows is None or len(stats[name].rows) == max_rows  # complete: trimmed, filled
        completed.append((name, len(calls)))

    layer_major = input_stats(gm, data, targets, rows_of, max_rows, when_complete)
    for h in handles:
        h.remove()
    # each layer completes right after its own 4 calls, before any later layer ran
    assert completed == [(n, 4 * (i + 1)) for i, n in enumerate(targets)]
    for n in targets:
        a, b = sample_major[n], layer_major[n]
        assert torch.equal(a.lo, b.lo) and torch.equal(a.hi, b.hi)
        assert (a.rows is None) == (b.rows is None)
        if a.rows is not None:
            assert torch.equal(a.rows, b.rows)


class _CountingAWQ(AWQScale):
    """AWQScale recording, each time a group is ready, how many layers' rows are held."""

    def group_ready(self, gm, group, stats):
        self.held = getattr(self, "held", []) + [sum(st.rows is not None for st in stats.values())]
        super().group_ready(gm, group, stats)


def test_awq_holds_one_groups_rows_at_a_time_and_chooses_as_over_all_rows():
    data = _data(4)
    model = Block().eval()
    awq = _CountingAWQ(data, max_rows=64, options=SchemeOptions(group_size=16))
    gm = PassManager([ResolveSchemes(default="w4a16", disable_last_layer=False), awq])(fxquant.capture(model, (data[0][0],)))
    assert awq.held and max(awq.held) == 1
    assert set(awq.chosen) == set(awq.scales)
    # the same alphas as a search over all groups' rows at once (choose_scales without group_ready)
    again = AWQScale(data, max_rows=64, options=SchemeOptions(group_size=16))
    gm2 = fxquant.capture(Block().eval(), (data[0][0],))
    gm2.load_state_dict(model.state_dict())
    gm2 = ResolveSchemes(default="w4a16", disable_last_layer=False)(gm2)
    groups = again.find_groups(gm2)
    stats = input_stats(gm2, data, [n.target for g in groups for n in g.members], *again.rows_wanted(groups))
    again.choose_scales(gm2, groups, stats)
    assert again.chosen == awq.chosen
    x = data[1][0]
    with torch.no_grad():
        assert torch.allclose(gm(x), model(x), atol=1e-4, rtol=1e-4)
