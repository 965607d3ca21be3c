import math

import pytest

from zephyr_ray.config import SFTRecipe
from zephyr_ray.train.engine import lr_lambda
from zephyr_ray.train.launch import plan_steps


def test_cosine_with_warmup_by_hand():
    f = [lr_lambda(s, 10, 2, "cosine", 0.0) for s in range(11)]
    assert f[:3] == [0.0, 0.5, 1.0]
    assert f[6] == pytest.approx(0.5 * (1 + math.cos(math.pi * 4 / 8)))
    assert f[10] == pytest.approx(0.0)
    assert lr_lambda(10, 10, 2, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_lambda(6, 10, 2, "linear", 0.0) == pytest.approx(0.5)
    assert lr_lambda(9, 10, 2, "constant", 0.0) == 1.0


def test_plan_steps():
    cfg = SFTRecipe()
    cfg.train.micro_batch_size, cfg.train.gradient_accumulation_steps, cfg.train.epochs = 4, 2, 3
    plan, dropped = plan_steps(23, 2, cfg)  # 11 rows a worker -> 3 micro-batches -> 2 steps an epoch
    assert (plan.total_steps, plan.micro_batches_per_epoch, dropped) == (6, 3, 1)
    cfg.train.max_steps = 4
    assert plan_steps(23, 2, cfg)[0].total_steps == 4
    with pytest.raises(ValueError, match="cannot feed"):
        plan_steps(1, 2, cfg)
