import math
from dataclasses import replace

import pytest
import torch

from zephyr_ray.config import SFTRecipe, TrainConfig
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
    cfg = SFTRecipe(train=TrainConfig(micro_batch_size=4, gradient_accumulation_steps=2, epochs=3))
    plan, dropped = plan_steps(23, 2, cfg)  # 11 rows a worker -> 3 micro-batches -> 2 steps an epoch
    assert (plan.total_steps, plan.micro_batches_per_epoch, dropped) == (6, 3, 1)
    cfg = replace(cfg, train=replace(cfg.train, max_steps=4))
    assert plan_steps(23, 2, cfg)[0].total_steps == 4
    with pytest.raises(ValueError, match="cannot feed"):
        plan_steps(1, 2, cfg)


class _Scaled(torch.nn.Module):
    """A stand-in engine: one weight, a device, train/eval modes."""

    device = torch.device("cpu")

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(2.0))


class _SumObjective:
    """Loss = weight x the batch's values summed; one unit per value; records the mode it ran in."""

    def __init__(self):
        self.modes = []

    def collate(self, batch):
        return {"x": torch.tensor(batch["x"], dtype=torch.float32)}

    def units(self, batch):
        return len(batch["x"])

    def loss(self, model, batch):
        self.modes.append((model.training, torch.is_grad_enabled()))
        loss = model.w * batch["x"].sum()
        return loss, {"rewards/count": torch.tensor(float(len(batch["x"])))}


@pytest.fixture
def one_rank_group():
    import socket

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already up in this process")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_evaluate_averages_over_units_without_gradient_and_a_stand_in_counts_nothing(one_rank_group):
    from zephyr_ray.train.loop import eval_batches, evaluate

    engine, objective = _Scaled(), _SumObjective()
    engine.train()
    batches = [{"x": [1.0, 2.0]}, {"x": [3.0, 4.0]}, {"x": [5.0]}]
    got = evaluate(engine, objective, batches, counted=True)
    # (2 * 15) / 5 values; the extra is summed per batch (2 + 2 + 1) and averaged by the same 5 units.
    assert got == {"eval_loss": pytest.approx(6.0), "eval_rewards/count": pytest.approx(1.0)}
    assert objective.modes == [(False, False)] * 3 and engine.training  # eval mode, no grad, then back
    assert evaluate(engine, objective, batches[:1], counted=False) == {"eval_loss": 0.0, "eval_rewards/count": 0.0}
    import pyarrow as pa

    assert eval_batches(pa.table({"x": [1.0, 2.0, 3.0, 4.0, 5.0]}), 2) == batches


@pytest.mark.ray
def test_eval_shares_deal_every_row_to_exactly_one_rank(ray_cluster):
    import ray
    import ray.data

    from zephyr_ray.train.launch import eval_shares

    ds = ray.data.from_items([{"i": i} for i in range(5)]).repartition(2)
    shares = eval_shares(ds, 3)
    got = [ray.get(ref)["i"].to_pylist() for ref, _ in shares]
    assert sorted(i for rows in got for i in rows) == [0, 1, 2, 3, 4] and [len(r) for r in got] == [2, 2, 1]
    assert all(counted for _, counted in shares)
    wide = eval_shares(ds, 7)
    assert [counted for _, counted in wide] == [True] * 5 + [False] * 2  # stand-ins: one row, counted 0
    assert [ray.get(ref).num_rows for ref, _ in wide] == [1] * 7
    with pytest.raises(ValueError, match="no rows"):
        eval_shares(ds.limit(0), 2)
