import pytest
import torch
from conftest import compose_config

from launcher.errors import ConfigError
from launcher.training.optim import build_optimizer, build_scheduler


def _optimizer(lr=1.0):
    return torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=lr)


def test_plateau_with_warmup_warms_up_then_follows_the_eval_loss():
    cfg = compose_config(["scheduler=plateau_with_warmup", "scheduler.warmup_ratio=0.1", "scheduler.kwargs.patience=0"])
    optimizer = _optimizer(lr=1.0)
    schedule = build_scheduler(optimizer, cfg.scheduler, total_steps=40)  # 4 warmup steps
    lrs = []
    for _ in range(4):
        lrs.append(schedule.get_last_lr()[0])
        schedule.step()
    assert lrs == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert schedule.get_last_lr()[0] == pytest.approx(1.0)
    schedule.observe_eval(2.0)
    schedule.observe_eval(2.0)  # no improvement, patience 0 -> reduce by factor 0.5
    assert schedule.get_last_lr()[0] == pytest.approx(0.5)
    for _ in range(10):
        schedule.step()  # steps after warmup leave the lr alone
    assert schedule.get_last_lr()[0] == pytest.approx(0.5)
    state = schedule.state_dict()
    fresh = build_scheduler(_optimizer(), cfg.scheduler, total_steps=40)
    fresh.load_state_dict(state)
    assert fresh.steps == schedule.steps


@pytest.mark.parametrize("name", ["cosine", "linear", "constant_with_warmup", "polynomial", "inverse_sqrt",
                                  "cosine_with_restarts"])
@pytest.mark.filterwarnings(r"ignore:Detected call of `lr_scheduler.step\(\)`")
def test_transformers_schedules_warm_up_without_a_zero_step_then_follow_transformers(name):
    """Warmup over 2 of 8 steps: 1/3 and 2/3 of the peak (transformers': 0 and 1/2), then
    transformers' own schedule step for step."""
    from transformers import get_scheduler

    cfg = compose_config([f"scheduler={name}", "scheduler.warmup_ratio=0.25"])
    schedule = build_scheduler(_optimizer(lr=1.0), cfg.scheduler, total_steps=8)
    reference = get_scheduler(name, _optimizer(lr=1.0), num_warmup_steps=2, num_training_steps=8)
    seen, expected = [], []
    for _ in range(8):
        seen.append(schedule.get_last_lr()[0])
        expected.append(reference.get_last_lr()[0])
        schedule.step()
        reference.step()
    assert seen[:2] == pytest.approx([1 / 3, 2 / 3]) and expected[:2] == pytest.approx([0.0, 0.5])
    assert seen[2:] == pytest.approx(expected[2:]) and seen[-1] > 0


@pytest.mark.parametrize("steps, ratio, first_lrs", [(1, 0.05, [1.0]), (2, 0.5, [0.5, 1.0]), (4, 1.0, [0.25, 0.5, 0.75, 1.0])])
def test_warmup_never_takes_the_whole_run(steps, ratio, first_lrs):
    cfg = compose_config(["scheduler=constant_with_warmup", f"scheduler.warmup_ratio={ratio}"])
    schedule = build_scheduler(_optimizer(lr=1.0), cfg.scheduler, total_steps=steps)
    seen = []
    for _ in range(steps):
        seen.append(schedule.get_last_lr()[0])
        schedule.step()
    assert seen == pytest.approx(first_lrs)


def test_eval_driven_transformers_schedule():
    cfg = compose_config(["scheduler.name=reduce_lr_on_plateau", "scheduler.warmup_ratio=0", "+scheduler.kwargs.patience=0"])
    optimizer = _optimizer(lr=1.0)
    schedule = build_scheduler(optimizer, cfg.scheduler, total_steps=10)
    schedule.observe_eval(1.0)
    schedule.observe_eval(1.0)
    assert schedule.get_last_lr()[0] < 1.0


def test_optimizer_kwargs_go_straight_to_the_class():
    cfg = compose_config([])
    optimizer = build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optimizer)
    assert isinstance(optimizer, torch.optim.AdamW)
    group = optimizer.param_groups[0]
    assert group["betas"] == (0.9, 0.95) or list(group["betas"]) == [0.9, 0.95]
    assert group["eps"] == 1e-5 and group["weight_decay"] == 0.1


def test_any_torch_optimizer_by_target():
    from launcher.cli.validate import check_config

    cfg = compose_config(["optimizer._target_=torch.optim.Adagrad", "~optimizer.betas", "~optimizer.eps"])
    check_config(cfg)
    assert isinstance(build_optimizer([torch.nn.Parameter(torch.zeros(1))], cfg.optimizer), torch.optim.Adagrad)
    bad = compose_config(["optimizer._target_=torch.optim.Adagrad"])
    with pytest.raises(ConfigError, match="optimizer.betas is not a parameter of torch.optim.Adagrad"):
        check_config(bad)
