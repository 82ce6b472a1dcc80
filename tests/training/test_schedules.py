"""LR schedules at chosen steps; warmup shapes; plateau-adaptive LR; state round-trips."""

import io
import math

import pytest
import torch

from Ava.config import PlateauConfig, SchedulerConfig
from Ava.training.adaptive_lr import PlateauLR
from Ava.training.advanced_warmup import radam_rectification
from Ava.training.lr_manager import build_schedule, build_scheduler

PEAK, END, TOTAL, WARM = 1.0, 0.1, 110, 10


def _lr(name, step, **kw):
    cfg = SchedulerConfig(name=name, warmup_steps=kw.pop("warmup_steps", WARM), lr_end=END, **kw)
    return build_schedule(cfg, PEAK, TOTAL)(step)


@pytest.mark.parametrize("name", ["cosine", "linear", "wsd", "inverse_sqrt", "polynomial", "cosine_restarts"])
def test_every_decay_starts_at_peak_and_ends_at_lr_end(name):
    assert _lr(name, WARM - 1) == pytest.approx(1.0)  # end of warmup
    assert _lr(name, WARM) == pytest.approx(1.0)  # first decay step
    assert _lr(name, TOTAL - 1) == pytest.approx(END)
    values = [_lr(name, s) for s in range(WARM, TOTAL)]
    assert min(values) == pytest.approx(END) and max(values) == pytest.approx(1.0)


def test_values_at_chosen_steps():
    # decay phase: t = step − 10, n = 100 steps, progress p = t / 99
    assert _lr("cosine", 10 + 99 // 2) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 49 / 99)))
    assert _lr("linear", 10 + 33) == pytest.approx(0.1 + 0.9 * (1 - 33 / 99))
    assert _lr("polynomial", 10 + 33, power=2.0) == pytest.approx(0.1 + 0.9 * (1 - 33 / 99) ** 2)
    assert _lr("constant", 100) == 1.0
    # inverse sqrt: raw 1/sqrt(t+1) rescaled between 1 (t=0) and 1/sqrt(100) (t=99)
    raw = 1 / math.sqrt(16)
    assert _lr("inverse_sqrt", 10 + 15) == pytest.approx(0.1 + 0.9 * (raw - 0.1) / 0.9)


@pytest.mark.parametrize("shape", ["linear", "1-sqrt", "exponential"])
def test_wsd_is_flat_then_decays_in_the_last_fraction(shape):
    kw = {"wsd_decay_fraction": 0.2, "wsd_decay_shape": shape}
    # 100 decay-phase steps: stable for t < 80, decay over t = 80..99 with q = (t − 79)/20
    assert _lr("wsd", 10 + 79, **kw) == 1.0
    q = 10 / 20
    expected = {"linear": 0.1 + 0.9 * (1 - q), "1-sqrt": 0.1 + 0.9 * (1 - math.sqrt(q)), "exponential": 0.1 ** q}
    assert _lr("wsd", 10 + 89, **kw) == pytest.approx(expected[shape])
    assert _lr("wsd", 10 + 99, **kw) == pytest.approx(0.1)


def test_cosine_restarts_cycles_and_multiplier():
    # n = 100, cycles of 20 then 40 (mult 2); the next (80) does not fit, so the 40-step cycle
    # is stretched to the end of the run (t = 20..99)
    kw = {"cycle_steps": 20, "cycle_mult": 2.0}
    assert _lr("cosine_restarts", 10 + 19, **kw) == pytest.approx(END)  # end of cycle 1
    assert _lr("cosine_restarts", 10 + 20, **kw) == pytest.approx(1.0)  # restart
    assert _lr("cosine_restarts", 10 + 20 + 40, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 40 / 79)))
    # equal cycles tile the run: 4 × 25
    assert [_lr("cosine_restarts", 10 + t) for t in (0, 25, 50, 75)] == pytest.approx([1.0] * 4)
    assert _lr("cosine_restarts", 10 + 24) == pytest.approx(END)


def test_warmup_shapes():
    lin = [_lr("constant", s, warmup="linear") for s in range(WARM)]
    exp = [_lr("constant", s, warmup="exponential") for s in range(WARM)]
    rad = [_lr("constant", s, warmup="radam") for s in range(WARM)]
    assert lin == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert exp[0] == pytest.approx((1 - math.exp(-0.5)) / (1 - math.exp(-5))) and exp[-1] == pytest.approx(1.0)
    assert all(e > li for e, li in zip(exp[:-1], lin[:-1]))  # exponential rises faster early
    assert rad[-1] == pytest.approx(1.0) and rad[0] == 0.0 and all(b >= a for a, b in zip(rad, rad[1:]))
    # β2 = 0.8: ρ∞ = 9; the rectification is defined from t = 5 on
    assert radam_rectification(4, 0.8) == 0.0 and radam_rectification(5, 0.8) > 0.0
    assert rad[4] == pytest.approx(radam_rectification(5, 0.8) / radam_rectification(10, 0.8))


def test_scheduler_state_round_trips_weights_only_and_keeps_group_multipliers():
    p, q = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}], lr=1.0)
    cfg = SchedulerConfig(name="wsd", warmup="exponential", warmup_steps=5, lr_end=0.1)
    sched = build_scheduler(opt, cfg, 1.0, 50)
    for _ in range(7):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(0.5 * opt.param_groups[0]["lr"])
    buffer = io.BytesIO()
    torch.save(sched.state_dict(), buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    opt2 = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [q], "lr": 0.5}], lr=1.0)
    sched2 = build_scheduler(opt2, SchedulerConfig(), 1.0, 50)  # different config: state wins
    sched2.load_state_dict(state)
    for _ in range(40):
        opt.step(), opt2.step()
        sched.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def _plateau(**kw):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [p], "lr": 1.0}, {"params": [p.new_zeros(1).requires_grad_()], "lr": 0.5}])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return opt, PlateauLR(sched, PlateauConfig(enabled=True, **kw), peak_lr=1.0)


def test_plateau_reduces_after_patience_then_cools_down_and_floors():
    opt, plateau = _plateau(factor=0.5, patience=1, cooldown=1, threshold=0.0, min_lr=0.2)
    reduced = [plateau.step(v) for v in [3.0, 2.0, 2.0, 2.0, 2.0, 2.0, 2.0]]
    # best 2.0 at eval 2; bad evals 3, 4 → reduce at 4; cooldown eval 5; bad 6, 7 → reduce at 7
    assert reduced == [False, False, False, True, False, False, True]
    assert plateau.scale == pytest.approx(0.25) and opt.param_groups[0]["lr"] == pytest.approx(0.25)
    assert opt.param_groups[1]["lr"] == pytest.approx(0.125)
    assert [plateau.step(2.0) for _ in range(3)] == [False, False, True]  # cooldown, bad, bad → floor
    assert plateau.scale == pytest.approx(0.2)  # 0.125 is below the floor min_lr / peak
    assert not any(plateau.step(2.0) for _ in range(5))  # at the floor: no further reduction
    assert plateau.scheduler.base_lrs == pytest.approx([0.2, 0.1])


def test_plateau_improvement_resets_and_state_round_trips():
    _, plateau = _plateau(patience=1, threshold=0.01)
    assert not any(plateau.step(v) for v in [3.0, 2.99, 2.0])  # 2.99 is within threshold: 1 bad eval
    assert plateau.bad_evals == 0 and plateau.best == 2.0
    buffer = io.BytesIO()
    torch.save(plateau.state_dict(), buffer)
    buffer.seek(0)
    _, twin = _plateau(patience=1, threshold=0.01)
    twin.load_state_dict(torch.load(buffer, weights_only=True))
    assert twin.state_dict() == plateau.state_dict()
