"""DPO post-training: the loss formula, the first step at log 2, and the seed's launcher on raw video pairs."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mindspeed_mm.dpo.loss import dpo_loss
from tests.helpers.pipeline_fixtures import write_videos
from tests.helpers.training_fixtures import histogram_json as _histogram
from tests.helpers.training_fixtures import train_argv, write_dpo_configs

REPO = Path(__file__).resolve().parents[1]


def test_dpo_loss_formula():
    t = torch.tensor([0.25, 0.9])
    actor_w, actor_l = torch.tensor([0.010, 0.020]), torch.tensor([0.012, 0.020])
    ref_w, ref_l = torch.tensor([0.011, 0.021]), torch.tensor([0.011, 0.019])
    loss, metrics = dpo_loss(actor_w, actor_l, ref_w, ref_l, t, loss_beta=2.0, beta=0.1, label_smoothing=0.1,
                             pref_ftx=0.5, weights=torch.tensor([1.0, 2.0]))
    for i in range(2):
        scale = 2.0 * 1000 * (1 - t[i].item())
        rw, rl, qw, ql = (-scale * v[i].item() for v in (actor_w, actor_l, ref_w, ref_l))
        delta = (rw - rl) - (qw - ql)
        sig = 1 / (1 + math.exp(-0.1 * delta))
        want = (-math.log(sig) * 0.9 - math.log(1 - sig) * 0.1) * [1.0, 2.0][i] + 0.5 * (-rw)
        assert abs(loss[i].item() - want) < 1e-4 * max(1.0, abs(want))
        assert metrics["rewards/accuracies"][i].item() == float(0.1 * (rw - qw) > 0.1 * (rl - ql))
    # An actor equal to its reference is indifferent: loss log 2 whatever the pair.
    same, _ = dpo_loss(actor_w, actor_l, actor_w, actor_l, t, loss_beta=2000.0, beta=0.1)
    torch.testing.assert_close(same, torch.full((2,), math.log(2)))


def _env(**extra) -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), MINDSPEED_MM_DEVICE="cpu", OMP_NUM_THREADS="1", **extra)
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    return env


def _dpo_configs(tmp_path: Path, weight_alpha: float) -> dict:
    return write_dpo_configs(tmp_path, weight_alpha=weight_alpha)


def test_dpo_on_feature_pairs_starts_at_log2_and_trains_the_actor(tmp_path):
    paths = _dpo_configs(tmp_path, weight_alpha=1.0)
    proc = subprocess.run([sys.executable, str(REPO / "posttrain_sora_dpo.py"),
                           *train_argv(paths, tmp_path / "save", iters=2, extra=["--dpo-beta", "0.1"])],
                          capture_output=True, text=True, env=_env(), timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    losses = [float(line.split("| loss: ")[1].split(" ")[0]) for line in proc.stdout.splitlines() if "| loss: " in line]
    # Pair weight (max_num/total_num / sqrt(P(0.8)·P(0.3)))^1 with P(0.8) = 0 -> clamped to 1e-3: 0.5 / 1e-3.
    assert abs(losses[0] - math.log(2) * 500.0) < 1e-3
    metrics = [json.loads(line) for line in (tmp_path / "save" / "metrics.jsonl").read_text().splitlines()]
    assert "rewards/accuracies" in metrics[0] and metrics[0]["rewards/margins"] == 0.0
    trained = torch.load(tmp_path / "save/iter_0000002/mp_rank_00/model_optim_rng.pt", weights_only=False)["model"]
    from safetensors.torch import load_file

    official = load_file(str(paths["dit"] / "diffusion_pytorch_model.safetensors"))
    assert not torch.equal(trained["proj_out.weight"], official["proj_out.weight"])  # the actor moved
    assert "reference" not in " ".join(trained)  # only the actor is saved


def test_dpo_launcher_on_raw_video_pairs(tmp_path):
    from mindspeed_mm.checkpoint.convert import split
    from mindspeed_mm.tiny.download import write_tiny_download

    sections = write_tiny_download(tmp_path / "weights", task="t2v")
    split(sections["predictor"]["from_pretrained"], tmp_path / "converted", 1, [2], 2, log=lambda m: None)
    videos = tmp_path / "samples"
    write_videos(videos, [(f"video_{i}.mp4", 17) for i in range(4)])
    pairs = [{"file": "./video_0.mp4", "file_rejected": "./video_1.mp4", "captions": "a cat", "score": 0.9,
              "score_rejected": 0.1},
             {"file": "./video_3.mp4", "file_rejected": "./video_2.mp4", "captions": "一只猫", "score": 0.7,
              "score_rejected": 0.2}]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs))
    data = json.loads((REPO / "examples/stepvideo/t2v/data_dpo.json").read_text())
    param = data["dataset_param"]
    param["basic_parameters"].update(data_path=str(tmp_path / "data.jsonl"), data_folder=str(videos))
    param["preprocess_parameters"].update(num_frames=17, max_height=32, max_width=32, skip_frame_num=0,
                                          video_reader_type="PyAVVideo")
    param["tokenizer_config"] = sections["tokenizer"]
    model = json.loads((REPO / "examples/stepvideo/t2v/posttrain_t2v_model.json").read_text())
    model.update(predictor=sections["predictor"], text_encoder=sections["text_encoder"], ae=sections["ae"])
    model["predictor"]["from_pretrained"] = None
    model["dpo"]["histogram_path"] = str(_histogram(tmp_path / "video_score_histogram.json"))
    for name, obj in (("data_dpo.json", data), ("posttrain.json", model)):
        (tmp_path / name).write_text(json.dumps(obj, ensure_ascii=False))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = _env(MM_DATA=str(tmp_path / "data_dpo.json"), MM_MODEL=str(tmp_path / "posttrain.json"),
               LOAD_PATH=str(tmp_path / "converted"), SAVE_PATH=str(tmp_path / "save"), TRAIN_ITERS="1",
               LOG_DIR=str(tmp_path / "logs"), MASTER_PORT=str(port),
               PATH=os.pathsep.join([os.path.dirname(sys.executable), os.environ.get("PATH", "")]))
    proc = subprocess.run(["bash", "examples/stepvideo/t2v/posttrain_t2v_dpo.sh"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    assert "iteration        1/       1" in out and "loss: 6.93" in out  # log 2: actor == reference at step 1
    assert (tmp_path / "save" / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt").is_file()


def _dpo_run(tmp_path: Path, iters: int = 2, save_interval: int = 1):
    """A feature-pair DPO run of `iters` steps from the tiny official DiT; returns paths."""
    paths = _dpo_configs(tmp_path, weight_alpha=0)
    proc = _dpo(paths, tmp_path / "save", iters, ["--save-interval", str(save_interval)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return paths


def _dpo(paths: dict, save: Path, iters: int, extra=()) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "posttrain_sora_dpo.py"),
                           *train_argv(paths, save, iters=iters, extra=["--dpo-beta", "0.1", *extra])],
                          capture_output=True, text=True, env=_env(), timeout=600)


@pytest.fixture(scope="module")
def dpo_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return root, _dpo_run(root)


def test_a_dpo_step_raises_the_winners_margin(dpo_run, tmp_path):
    """After one step, on the pairs, t and noise of that step, the actor prefers the winner more than the reference
    does (margin > 0, loss < log 2). At --lr 0 the margin stays exactly 0, and weight decay alone moves the actor
    without raising it (both checked by hand), so this test sees a step that does not learn the preference."""
    import shutil

    from tests.helpers.training_eval import dpo_metrics, feature_samples, load_dit

    root, paths = dpo_run
    step1 = tmp_path / "step1"
    shutil.copytree(root / "save" / "iter_0000001", step1 / "iter_0000001")
    (step1 / "latest_checkpointed_iteration.txt").write_text("1")
    pairs = feature_samples(paths)[:2]  # the global batch of step 1 (micro-batch 1, 2 micro-batches)
    before = dpo_metrics(load_dit(paths["dit"]), load_dit(paths["dit"]), pairs, seed=1234, iteration=0)
    after = dpo_metrics(load_dit(step1), load_dit(paths["dit"]), pairs, seed=1234, iteration=0)
    assert before["rewards/margins"] == [0.0, 0.0]
    assert sum(after["rewards/margins"]) > 1e-3, after
    assert sum(after["loss"]) < 2 * math.log(2) - 1e-4, after


def test_resumed_dpo_keeps_the_reference_it_started_from(dpo_run, tmp_path):
    """Resuming with --load <save dir> used to make the actor at step N its own reference (loss exactly log 2)."""
    import shutil

    root, paths = dpo_run
    save = tmp_path / "save"
    shutil.copytree(root / "save", save)
    record = json.loads((save / "iter_0000002" / "dpo_reference.json").read_text())
    assert record["path"] == os.path.abspath(paths["dit"]) and len(record["fingerprint"]) == 1
    proc = _dpo(paths, save, 3, ["--load", str(save)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"DPO reference: {os.path.abspath(paths['dit'])}" in proc.stdout
    assert "recorded in the checkpoint" in proc.stdout
    metrics = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    step3 = [m for m in metrics if m["iteration"] == 3][-1]
    assert abs(step3["loss"] - math.log(2)) > 1e-4 and step3["rewards/margins"] != 0.0, step3
    assert json.loads((save / "iter_0000003" / "dpo_reference.json").read_text())["path"] == record["path"]


def test_resuming_without_a_reference_record_or_with_other_weights_is_refused(dpo_run, tmp_path):
    import shutil

    root, paths = dpo_run
    save = tmp_path / "save"
    shutil.copytree(root / "save", save)
    (save / "iter_0000002" / "dpo_reference.json").unlink()
    proc = _dpo(paths, save, 3, ["--load", str(save)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "recorded no DPO reference" in proc.stderr and "--finetune" in proc.stderr
    # A reference with other weights than the recorded one (here: the actor itself) is refused.
    shutil.copytree(root / "save" / "iter_0000002", save / "iter_0000002", dirs_exist_ok=True)
    model = json.loads(paths["model"].read_text())
    model["dpo"]["reference_path"] = str(save)
    other = dict(paths, model=tmp_path / "model_other_reference.json")
    other["model"].write_text(json.dumps(model))
    proc = _dpo(other, save, 3, ["--load", str(save)])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "has other weights than the reference" in proc.stderr


def test_frozen_modules_stay_out_of_the_module_tree(tmp_path):
    """The reference DiT, the VAE and the text encoders are held, not registered: parameters(), state_dict(),
    train() and requires_grad_() of the training module never reach them."""
    from mindspeed_mm.models.ae import StepVideoVAE
    from mindspeed_mm.models.diffusion import FlowMatchScheduler
    from mindspeed_mm.models.dpo_loss import DPOLossModel
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder
    from mindspeed_mm.config.base import from_dict
    from mindspeed_mm.config.model import MMModelConfig
    from mindspeed_mm.tiny.download import write_tiny_download
    from tests.helpers.training_eval import load_dit

    sections = write_tiny_download(tmp_path / "weights", task="t2v")
    cfg = from_dict(MMModelConfig, {"ae": sections["ae"], "text_encoder": sections["text_encoder"],
                                    "tokenizer": sections["tokenizer"]})
    vae = StepVideoVAE.from_config(cfg.ae)
    encoder = StepVideoTextEncoder.from_configs(cfg.text_encoder, cfg.tokenizer)
    dit = sections["predictor"]["from_pretrained"]
    model = DPOLossModel(load_dit(dit), FlowMatchScheduler(), load_dit(dit), vae=vae, text_encoder=encoder)
    actor = list(model.predictor.parameters())
    assert len(list(model.parameters())) == len(actor)
    assert set(model.state_dict()) == {f"predictor.{k}" for k in model.predictor.state_dict()}
    model.train().requires_grad_(True)
    for frozen in (model.reference, vae, encoder):
        assert not any(p.requires_grad for p in frozen.parameters())
        assert not any(m.training for m in frozen.modules())
    assert model.predictor.training
