import math

import pytest
import torch
from torch import nn

from scratchlm.errors import ScratchLMError
from scratchlm.training.optim import OptimConfig, build_optimizer, lr_multiplier, parameter_groups


def test_cosine_warms_up_then_decays_to_the_floor():
    config = OptimConfig(warmup_steps=10, schedule="cosine", min_lr_ratio=0.1)
    curve = [lr_multiplier(s, 100, config) for s in range(100)]
    assert curve[0] == pytest.approx(0.1) and curve[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(curve[10:], curve[11:]))
    assert lr_multiplier(100, 100, config) == pytest.approx(0.1)
    assert lr_multiplier(55, 100, config) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))


def test_wsd_holds_then_decays_over_the_last_fraction():
    config = OptimConfig(warmup_steps=10, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0)
    assert lr_multiplier(50, 100, config) == 1.0
    assert lr_multiplier(79, 100, config) == 1.0
    assert lr_multiplier(90, 100, config) == pytest.approx(0.5)
    assert lr_multiplier(100, 100, config) == pytest.approx(0.0)


def test_decay_groups_exclude_biases_and_norms():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4))
    decay, no_decay = parameter_groups(model, 0.1)
    assert {p.shape for p in decay["params"]} == {torch.Size([10, 4]), torch.Size([4, 4])}
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


def test_scheduler_drives_the_optimizer_lr():
    model = nn.Linear(2, 2)
    config = OptimConfig(lr=1.0, warmup_steps=4, schedule="constant")
    built = build_optimizer(model, config, total_steps=10)
    optimizer, scheduler = built["optimizer"], built["lr_scheduler"]["scheduler"]
    seen = []
    for _ in range(6):
        seen.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert seen == pytest.approx([0.25, 0.5, 0.75, 1.0, 1.0, 1.0])


def test_bad_optim_field_is_named():
    with pytest.raises(ScratchLMError, match="min_lr_ratio"):
        OptimConfig(min_lr_ratio=2.0)
