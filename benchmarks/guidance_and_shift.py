"""Does classifier-free guidance help the trained model, and which training noise levels suit the sampler?

    python benchmarks/guidance_and_shift.py [--iters 200] [--samples-per-class 16]

A tiny DiT (2 layers, 4 heads x 8) is trained through the real entry point (`pretrain_sora.py`'s `pretrain`) on
feature data whose caption decides the video: two classes, each with 4 training wordings (caption states S_c plus a
little noise) and latents +M or -M plus a little noise. Each setting below trains for `--iters` steps (global batch 4,
lr 3e-3) from the same random DiT:

- caption dropout (`preprocess_parameters.cfg`) 0 or 0.1;
- the training noise levels: `diffusion.train_shift` null (t = 1 - sigmoid(N(0, 1)), the default) or 3 or 13 (the
  sampler's shift).

Each trained DiT then samples, from noise, 30 Euler steps at shift 13 (the released sampler), with guidance 1 and 9
against the empty prompt, 4 unseen wordings per class x `--samples-per-class` / 4 seeds. Printed per setting and
guidance: prompt following (the share of samples closer to their own class's M than to the other's) and the mean
squared distance to their own M; and the sampler-weighted loss (the flow-matching loss of held-out samples averaged
over the sampler's 30 noise levels). One JSON line at the end.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mindspeed_mm.models.diffusion import FlowMatchScheduler  # noqa: E402

WORDINGS = 4
SETTINGS = [(0.0, None), (0.1, None), (0.1, 3.0), (0.1, 13.0)]


def _classes(gen: torch.Generator):
    pattern = torch.randn(2, 4, 2, 2, generator=gen)
    captions = [[torch.randn(1, 10, 16, generator=gen), torch.randn(1, 5, 8, generator=gen)] for _ in range(2)]
    return pattern, captions


def _wording(caption, gen: torch.Generator):
    return [t + 0.3 * torch.randn(t.shape, generator=gen) for t in caption]


def _write_data(paths: dict, pattern, captions, cfg: float, train_shift) -> None:
    folder = paths["data"].parent / "features_data"
    gen = torch.Generator().manual_seed(11)
    wordings = [[_wording(captions[c], gen) for _ in range(WORDINGS)] for c in range(2)]
    rows = []
    for i in range(16):
        c = i % 2
        data = {"video": (1 if c == 0 else -1) * pattern + 0.1 * torch.randn(pattern.shape, generator=gen),
                "prompt_ids": [t.clone() for t in wordings[c][(i // 2) % WORDINGS]],
                "prompt_mask": [torch.ones(1, 10, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)]}
        torch.save(data, folder / "features" / f"s{i}.pt")
        rows.append({"file": f"features/s{i}.pt", "captions": f"class {c}"})
    (folder / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data_cfg = json.loads(paths["data"].read_text())
    data_cfg["dataset_param"]["preprocess_parameters"] = {"cfg": cfg}
    paths["data"].write_text(json.dumps(data_cfg))
    model = json.loads(paths["model"].read_text())
    model["diffusion"]["train_shift"] = train_shift
    paths["model"].write_text(json.dumps(model))


def _train(root: Path, pattern, captions, cfg: float, train_shift, iters: int) -> tuple:
    from mindspeed_mm.training import pretrain
    from tests.helpers.training_fixtures import train_argv, write_training_configs

    paths = write_training_configs(root / "w")
    _write_data(paths, pattern, captions, cfg, train_shift)
    argv = train_argv(paths, root / "save", iters=iters, gbs=4,
                      extra=["--save-interval", str(iters), "--log-interval", str(iters)])
    argv[argv.index("--lr") + 1] = argv[argv.index("--min-lr") + 1] = "3e-3"
    pretrain(argv)
    return paths, root / "save"


def _empty(paths: dict):
    payload = torch.load(paths["data"].parent / "features_data" / "empty_prompt.pt")
    return payload["prompt_ids"], payload["prompt_mask"]


def _sample(dit, pattern, captions, empty, guidance: float, per_class: int):
    """(prompt following, mean squared distance to the own class's M) of sampling with unseen wordings."""
    scheduler = FlowMatchScheduler(shift=13.0)
    timesteps = scheduler.set_timesteps(30)
    gen = torch.Generator().manual_seed(5)
    labels, texts = [], [[], []]
    for c in range(2):
        for k in range(per_class):
            if k % (per_class // WORDINGS) == 0:
                wording = _wording(captions[c], gen)
            labels.append(c)
            for j in range(2):
                texts[j].append(wording[j])
    b = len(labels)
    cond = [torch.cat(t) for t in texts]
    cond_mask = [torch.ones(b, 10, dtype=torch.long), torch.ones(b, 5, dtype=torch.long)]
    uncond = [e.expand(b, *e.shape[1:]) for e in empty[0]]
    uncond_mask = [m.expand(b, *m.shape[1:]) for m in empty[1]]
    prompt = [torch.cat([c, u]) for c, u in zip(cond, uncond)]
    mask = [torch.cat([c, u]) for c, u in zip(cond_mask, uncond_mask)]
    latents = torch.randn(b, *pattern.shape, generator=gen)
    with torch.no_grad():
        for i, t in enumerate(timesteps):
            velocity = dit(torch.cat([latents, latents]), t.expand(2 * b), prompt, mask)
            c_v, u_v = velocity.chunk(2)
            latents = scheduler.step(scheduler.guidance(c_v, u_v, guidance), i, latents)
    targets = torch.stack([pattern if c == 0 else -pattern for c in labels])
    own = (latents - targets).pow(2).flatten(1).mean(1)
    other = (latents + targets).pow(2).flatten(1).mean(1)
    return (own < other).float().mean().item(), own.mean().item()


def _sampler_loss(dit, pattern, captions) -> float:
    """The flow-matching loss of held-out samples at each of the sampler's 30 noise levels, averaged."""
    from mindspeed_mm.models.diffusion_loss import DiffusionLossModel

    scheduler = FlowMatchScheduler(shift=13.0)
    levels = scheduler.set_timesteps(30)
    model = DiffusionLossModel(dit, FlowMatchScheduler())
    gen = torch.Generator().manual_seed(9)
    losses = []
    with torch.no_grad():
        for k, t in enumerate(levels):
            c = k % 2
            x0 = ((1 if c == 0 else -1) * pattern + 0.1 * torch.randn(pattern.shape, generator=gen))[None]
            wording = _wording(captions[c], gen)
            batch = {"video": x0, "prompt": wording,
                     "prompt_mask": [torch.ones(1, 10, dtype=torch.long), torch.ones(1, 5, dtype=torch.long)]}
            losses.append(model(batch, gen, t=t.reshape(1)).mean())
    return torch.stack(losses).mean().item()


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--iters", type=int, default=200)
    p.add_argument("--samples-per-class", type=int, default=16)
    p.add_argument("--seed", type=int, default=3, help="seed of the class patterns and caption states")
    args = p.parse_args(argv)
    from tests.helpers.training_eval import load_dit

    torch.set_num_threads(1)
    pattern, captions = _classes(torch.Generator().manual_seed(args.seed))
    rows = []
    print(f"tiny DiT, two caption classes, {args.iters} steps; sampling 30 steps at shift 13, "
          f"{2 * args.samples_per_class} samples from unseen wordings")
    print("cfg  | train_shift | guidance | prompt following | distance to own class | sampler-weighted loss")
    for cfg, shift in SETTINGS:
        root = Path(tempfile.mkdtemp(prefix="guidance_"))
        paths, save = _train(root, pattern, captions, cfg, shift, args.iters)
        dit = load_dit(save)
        empty = _empty(paths)
        sampler_loss = _sampler_loss(dit, pattern, captions)
        for guidance in (1.0, 9.0):
            follow, distance = _sample(dit, pattern, captions, empty, guidance, args.samples_per_class)
            rows.append({"cfg": cfg, "train_shift": shift, "guidance": guidance, "prompt_following": follow,
                         "distance": distance, "sampler_loss": sampler_loss})
            print(f"{cfg:4.2f} | {str(shift):>11s} | {guidance:8.0f} | {follow:16.0%} | {distance:21.3f} | "
                  f"{sampler_loss:.3f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
