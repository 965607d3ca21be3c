"""DPO-family losses against values computed by hand."""

import math

import pytest
import torch

from zephyr_ray.train.losses import preference_loss, sequence_logps


def _t(*xs):
    return torch.tensor(xs, dtype=torch.float64, requires_grad=True)


def _sp(x):  # softplus(x) = -log σ(-x)
    return math.log1p(math.exp(x)) if x < 30 else x


def test_sigmoid_by_hand():
    pc, pr, rc, rr = _t(-10.0, -3.0), _t(-12.0, -2.0), _t(-11.0, -3.0), _t(-11.0, -3.0)
    losses, cr, rj = preference_loss(pc, pr, rc, rr, beta=0.1)
    # pair 0: Δ = (1) - (-1) = 2; pair 1: Δ = 0 - 1 = -1
    assert losses.tolist() == pytest.approx([_sp(-0.2), _sp(0.1)])
    assert cr.tolist() == pytest.approx([0.1, 0.0]) and rj.tolist() == pytest.approx([-0.1, 0.1])
    smooth, _, _ = preference_loss(pc, pr, rc, rr, beta=0.1, label_smoothing=0.25)
    assert smooth.tolist() == pytest.approx([0.75 * _sp(-0.2) + 0.25 * _sp(0.2), 0.75 * _sp(0.1) + 0.25 * _sp(-0.1)])


def test_ipo_and_hinge_by_hand():
    args = (_t(-1.0), _t(-4.0), _t(-2.0), _t(-3.0))  # Δ = 1 - (-1) = 2
    ipo, _, _ = preference_loss(*args, beta=0.5, loss_type="ipo")
    assert ipo.item() == pytest.approx((2 - 1 / (2 * 0.5)) ** 2)
    hinge, _, _ = preference_loss(*args, beta=0.25, loss_type="hinge")
    assert hinge.item() == pytest.approx(0.5)
    hinge, _, _ = preference_loss(*args, beta=1.0, loss_type="hinge")
    assert hinge.item() == 0.0
    with pytest.raises(ValueError, match="loss_type"):
        preference_loss(*args, beta=1.0, loss_type="kto")


def test_apo_zero_by_hand_and_it_lifts_a_falling_chosen_answer():
    args = (_t(-1.0), _t(-4.0), _t(-2.0), _t(-3.0))  # r_c = 1, r_r = -1
    apo, cr, rj = preference_loss(*args, beta=0.5, loss_type="apo_zero")
    assert apo.item() == pytest.approx(2 / (1 + math.exp(0.5)))  # (1 - σ(0.5)) + σ(-0.5)
    assert (cr.item(), rj.item()) == pytest.approx((0.5, -0.5))
    # Both answers fell, the rejected one far more (Δ = 45): DPO's loss is spent, APO-zero still lifts the chosen one.
    for loss_type, lifts in (("sigmoid", False), ("apo_zero", True)):
        pc, pr = _t(-15.0), _t(-60.0)
        losses, _, _ = preference_loss(pc, pr, _t(-10.0), _t(-10.0), beta=1.0, loss_type=loss_type)
        losses.sum().backward()
        assert (pc.grad.item() < -1e-3) is lifts  # a negative gradient: a step raises log π(chosen)
        if lifts:
            assert pc.grad.item() == pytest.approx(-math.exp(5) / (1 + math.exp(5)) ** 2)  # -σ'(-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge", "apo_zero"])
@pytest.mark.parametrize("margin", [1e4, -1e4, 1e8, -1e8])
def test_extreme_margins_stay_finite(loss_type, margin):
    pc = _t(margin / 2)
    pr = _t(-margin / 2)
    losses, _, _ = preference_loss(pc, pr, _t(0.0), _t(0.0), beta=0.1, loss_type=loss_type, label_smoothing=0.1)
    losses.sum().backward()
    assert torch.isfinite(losses).all() and torch.isfinite(pc.grad).all() and torch.isfinite(pr.grad).all()
    if loss_type == "sigmoid":
        # -log σ(-x) ≈ x for large x: the smoothed term grows linearly, never inf.
        expected = 0.9 * _sp(-0.1 * margin) + 0.1 * _sp(0.1 * margin)
        assert losses.item() == pytest.approx(expected, rel=1e-6)


def test_sequence_logps_by_hand():
    # Three selected positions, vocab 2: two belong to sequence 0, one to sequence 1.
    logits = torch.zeros(3, 2)
    logits[1] = torch.tensor([0.0, math.log(3.0)])  # p(token 1) = 0.75
    logps, counts, logit_sums = sequence_logps(logits, torch.tensor([0, 1, 1]), torch.tensor([0, 0, 1]), 2)
    assert counts.tolist() == [2, 1]
    assert logps.tolist() == pytest.approx([math.log(0.5) + math.log(0.75), math.log(0.5)])
    assert logit_sums.tolist() == pytest.approx([math.log(3.0) / 2, 0.0])
