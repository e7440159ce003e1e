"""The flow-matching scheduler against the official scheduler's golden case, and the training convention."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mindspeed_mm.config.model import DiffusionConfig
from mindspeed_mm.models import get_model_class, get_scheduler_class
from mindspeed_mm.models.diffusion import FlowMatchScheduler

GOLDEN = Path(__file__).parent / "golden" / "stepvideo"
IO = load_file(GOLDEN / "scheduler_flowmatch.io.safetensors")
CASE = json.loads((GOLDEN / "scheduler_flowmatch.json").read_text())


@pytest.mark.parametrize("steps,shift", [(50, 13.0), (30, 13.0), (10, 17.0)])
def test_schedules_are_bitwise_official(steps, shift):
    scheduler = FlowMatchScheduler(shift=shift)
    timesteps = scheduler.set_timesteps(steps)
    tag = f"N{steps}_shift{int(shift)}"
    assert torch.equal(scheduler.sigmas, IO[f"output.sigmas_{tag}"])
    assert torch.equal(timesteps, IO[f"output.timesteps_{tag}"])
    assert scheduler.sigmas[0] == 0 and scheduler.sigmas[-1] == 1  # from pure noise to data


def test_euler_steps_and_full_loop_match_official():
    for step in CASE["euler_steps"]:
        scheduler = FlowMatchScheduler(shift=step["time_shift"])
        scheduler.set_timesteps(step["num_inference_steps"])
        name = step["name"]
        assert scheduler.timesteps[step["index"]] == IO[f"input.{name}.t_i"][0]
        out = scheduler.step(IO[f"input.{name}.model_output"], step["index"], IO[f"input.{name}.sample"])
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, IO[f"output.{name}.next_sample"], rtol=1e-6, atol=1e-6)
    scheduler = FlowMatchScheduler(shift=17.0)
    x = IO["input.loop.x0"]
    for i, _ in enumerate(scheduler.set_timesteps(10)):
        x = scheduler.step(IO["input.loop.velocities"][i], i, x)
    torch.testing.assert_close(x, IO["output.loop.final_sample"], rtol=1e-6, atol=1e-6)


def test_training_convention_of_the_released_weights():
    scheduler = FlowMatchScheduler()
    x0, noise = torch.randn(3, 2, 4, 2, 2), torch.randn(3, 2, 4, 2, 2)
    t = torch.tensor([0.0, 0.25, 1.0])
    xt = scheduler.add_noise(x0, noise, t)
    assert torch.equal(xt[0], noise[0]) and torch.equal(xt[2], x0[2])  # t = 0 is noise, t = 1 is data
    torch.testing.assert_close(xt[1], 0.25 * x0[1] + 0.75 * noise[1])
    target = scheduler.velocity_target(x0, noise)
    # The exact velocity moves x_t to the data in one Euler step of length 1 - t.
    torch.testing.assert_close(xt[1] + target[1] * (1 - 0.25), x0[1])
    loss = scheduler.loss(target + 1.0, target)
    assert loss.shape == (3,) and torch.allclose(loss, torch.ones(3))
    plain = FlowMatchScheduler(train_shift=None)  # "train_shift": null, the unshifted logit-normal t
    draws = plain.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < draws.min() and draws.max() < 1 and abs(draws.median().item() - 0.5) < 0.02
    shifted = scheduler.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))  # the default, 13
    assert shifted.median() < 0.2  # the shift moves training toward high noise (small t)
    # where 30-step shift-13 sampling spends its steps: below t = 0.1 about 60 % of them; now training too
    steps = FlowMatchScheduler().set_timesteps(30)
    assert (steps < 0.1).float().mean() > 0.5 and (shifted < 0.1).float().mean() > 0.5
    assert (draws < 0.1).float().mean() < 0.02
    torch.testing.assert_close(FlowMatchScheduler.guidance(torch.ones(2), torch.zeros(2), 9.0), torch.full((2,), 9.0))


def test_config_and_errors():
    cfg = DiffusionConfig(num_train_timesteps=1, num_inference_timesteps=5, shift=13.0)
    scheduler = get_scheduler_class("flow_match_discrete_scheduler").from_config(cfg)
    # A scheduler is not a model: it has its own registry.
    with pytest.raises(KeyError, match="model_id 'flow_match_discrete_scheduler' is not registered"):
        get_model_class("flow_match_discrete_scheduler")
    assert isinstance(scheduler, FlowMatchScheduler) and scheduler.set_timesteps().shape == (5,)
    assert FlowMatchScheduler.from_config(DiffusionConfig(train_shift=3.0)).train_shift == 3.0
    assert DiffusionConfig().train_shift == 13.0 and FlowMatchScheduler().train_shift == 13.0
    with pytest.raises(ValueError, match=r"reverse = true .* set \"reverse\": false"):
        FlowMatchScheduler(reverse=True)
    with pytest.raises(ValueError, match=r"solver 'heun' is not supported"):
        FlowMatchScheduler(solver="heun")
    with pytest.raises(ValueError, match=r"set the number of sampling steps"):
        FlowMatchScheduler().set_timesteps()
    with pytest.raises(RuntimeError, match=r"call set_timesteps\(\) before step\(\)"):
        FlowMatchScheduler().step(torch.zeros(1), 0, torch.zeros(1))
