"""training/run/budget.py: train.max_minutes fixes max_steps (and the LR horizon) from the measured step time."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from diffusers.optimization import get_scheduler
from transformers.optimization import get_wsd_schedule

from training.run import budget as budget_module
from training.run.budget import Horizon, StepBudget


@pytest.mark.parametrize("name", ["linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup"])
def test_the_horizon_schedule_is_diffusers_schedule_of_the_same_length(name):
    def lrs(make):
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
        sched = make(opt)
        out = []
        for _ in range(45):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    ours = lrs(Horizon(name, 5, 40, lr_init=0.5).scheduler)  # polynomial's decay is relative to the optimizer's lr
    assert ours == lrs(lambda opt: get_scheduler(name, opt, num_warmup_steps=5, num_training_steps=40))
    if name == "constant_with_warmup":  # warmup_stable_decay: the same, then 1-sqrt to 0 over the last quarter
        wsd = lrs(Horizon("warmup_stable_decay", 5, 40, lr_init=0.5, decay_fraction=0.25).scheduler)
        assert wsd == lrs(lambda opt: get_wsd_schedule(opt, 5, 10, num_training_steps=40, decay_type="1-sqrt"))
        assert wsd[:30] == ours[:30] and wsd[35] == pytest.approx(0.5 * (1 - 0.5**0.5)) and wsd[40:] == [0.0] * 5


class _Clock:
    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


class _Log:
    def __init__(self):
        self.records = []

    def write(self, **record):
        self.records.append(record)


def _run(monkeypatch, cost, cap=1000, minutes=1.0, gan_start=None, state=None, steps=None, schedule="cosine"):
    """A fake loop: step s costs cost(s) seconds of a fake clock; returns (budget, log, LRs used per step, optimizer)."""
    clock = _Clock()
    monkeypatch.setattr(budget_module, "time", clock)
    accelerator = SimpleNamespace(device="cpu", gather=lambda t: t)
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    horizon = Horizon(schedule, 10, cap, 1.0)
    sched = horizon.scheduler(opt)
    state = dict(state or {"step": 0})
    train_cfg = SimpleNamespace(max_minutes=minutes, max_steps=cap)
    budget = StepBudget(train_cfg, horizon, state, accelerator, opt, sched, (gan_start,))
    log, bar, lrs = _Log(), SimpleNamespace(total=cap, refresh=lambda: None), []
    step = state["step"]
    for _ in range(state["step"]):
        sched.step()
    while step < budget.max_steps and (steps is None or step < steps):
        lrs.append(opt.param_groups[0]["lr"])
        clock.now += cost(step + 1)
        sched.step()
        step += 1
        budget.after_step(step, log, bar)
    return budget, log.records, lrs, step


def test_the_probe_fixes_max_steps_from_the_measured_step_time_and_the_horizon_from_it(monkeypatch):
    # 0.5 s a step, 60 s: timing starts after step 5 and ends after 10 s of steps (step 25) at 12.5 s of
    # the budget; 47.5 s left = 95 steps more: max_steps 120, and from step 26 on the cosine over 120 steps
    budget, log, lrs, last = _run(monkeypatch, lambda s: 0.5)
    assert budget.max_steps == 120 and last == 120
    assert log == [{"step": 25, "event": "budget", "max_minutes": 1.0, "seconds_per_step": 0.5, "seconds_so_far": 12.5,
                    "max_steps": 120, "phase_start": 0}]  # fmt: skip
    factor_cap, factor_fixed = Horizon("cosine", 10, 1000, 1.0).factor, Horizon("cosine", 10, 120, 1.0).factor
    assert lrs[:25] == pytest.approx([factor_cap(s) for s in range(25)])  # before the budget is known: the cap's schedule
    assert lrs[25:] == pytest.approx([factor_fixed(s) for s in range(25, 120)])
    assert lrs[-1] < 0.01  # decayed to the fixed end, not to step 1000's
    assert budget.state() == {"budget_max_steps": 120, "budget_seconds": 60.0, "budget_phases": [0]}


def test_warmup_stable_decay_decays_over_the_last_fifth_of_the_steps_the_budget_fixed(monkeypatch):
    # as above: fixed at 120 steps after step 25; the decay is the last 24 of those, not the last 200 of the cap's 1000
    _, _, lrs, last = _run(monkeypatch, lambda s: 0.5, schedule="warmup_stable_decay")
    assert last == 120 and lrs[10:97] == [1.0] * 87
    assert lrs[97] == pytest.approx(1 - (1 / 24) ** 0.5) and lrs[-1] == pytest.approx(1 - (23 / 24) ** 0.5)


def test_the_cap_wins_when_the_budget_would_allow_more_and_no_budget_changes_nothing(monkeypatch):
    assert _run(monkeypatch, lambda s: 0.5, cap=80)[0].max_steps == 80
    budget, log, _, last = _run(monkeypatch, lambda s: 0.5, cap=80, minutes=None)
    assert (budget.max_steps, log, last, budget.state()) == (80, [], 80, {})


def test_a_costlier_phase_is_measured_again_when_it_starts(monkeypatch):
    # 0.5 s a step, then 1 s from step 50 (the GAN): fixed at 120 after step 25; 25 s at step 50, timing
    # from step 55 (30 s) to 65 (40 s): 20 s left at 1 s a step, max_steps 85
    budget, log, _, last = _run(monkeypatch, lambda s: 0.5 if s <= 50 else 1.0, gan_start=50)
    assert [(r["step"], r["max_steps"], r["phase_start"]) for r in log] == [(25, 120, 0), (65, 85, 50)]
    assert last == 85 and budget.state()["budget_phases"] == [0, 50]


def test_a_resumed_run_keeps_the_fixed_max_steps_and_counts_the_time_already_spent(monkeypatch):
    first, _, _, stopped = _run(monkeypatch, lambda s: 0.5, steps=40)  # fixed at step 25, stopped at 40
    state = {"step": stopped, **first.state()}
    budget, log, lrs, last = _run(monkeypatch, lambda s: 5.0, state=state)  # slower now: not measured again
    assert (budget.max_steps, last, log) == (120, 120, [])
    assert lrs[0] == pytest.approx(Horizon("cosine", 10, 120, 1.0).factor(40))
    # stopped before the probe ended: measured again after the restart, with the budget that is left
    early, _, _, stopped = _run(monkeypatch, lambda s: 0.5, steps=20)
    budget, log, _, _ = _run(monkeypatch, lambda s: 1.0, state={"step": stopped, **early.state()})
    # 10 s spent by step 20; restart: timing from step 21 (11 s) to 31 (21 s): 39 s left at 1 s a step
    assert log[0]["step"] == 31 and budget.max_steps == 70
