"""Feature extraction (特征提取): VAE latents and both text encoders' states, one .pt file per video.

    bash examples/stepvideo/feature_extract/feature_extraction.sh       # t2v
    bash examples/stepvideo/feature_extract/feature_extraction_i2v.sh   # i2v (adds image_latents)

or directly, with the launchers' flags:

    torchrun --nproc_per_node N mindspeed_mm/tools/feature_extraction/get_sora_feature.py \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1 \
        --micro-batch-size 1 --global-batch-size N --mm-data data.json --mm-model model.json --mm-tool tools.json

Output, under `sorafeature.save_path` of the tools JSON:

    data.jsonl                 one line per extracted video: the source row with "file" = "features/<name>.pt"
    features/<name>.pt         torch.save({"video": latents (t, z, h, w),
                                           "prompt_ids": [llm states (1, L1, C1), clip states (1, L2, C2)],
                                           "prompt_mask": [(1, L1), (1, L2)] int64,
                                           "image_latents": (t, z, h, w)   # i2v only})

`<name>` is the video's path relative to data_folder with separators and dots replaced, so equal basenames in
different folders do not collide (they do in MindSpeed-MM). data.jsonl lists only what was written, in manifest
order, after extraction (MindSpeed-MM writes it first and leaves dangling entries). Rows whose .pt already exists are
kept, not recomputed, so an interrupted run resumes. Unreadable videos are skipped and counted. Work is split over all
ranks (data parallel); each .pt is written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import List, Optional

import torch

if __package__ in (None, ""):  # run as a script (the seed's launchers do): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from mindspeed_mm.arguments import ArgumentError, parse_args  # noqa: E402

logger = logging.getLogger("mindspeed_mm.feature_extraction")


def feature_name(file: str) -> str:
    """'videos/a/1.mp4' -> 'videos_a_1_mp4.pt': unique per source path, readable, filesystem-safe."""
    stem = re.sub(r"[^0-9A-Za-z_-]+", "_", os.path.normpath(file).lstrip("./"))
    return f"{stem.strip('_')}.pt"


def _output_row(row, name: str) -> dict:
    captions = row.captions[0] if len(row.captions) == 1 else list(row.captions)
    return {**row.extra, "file": f"features/{name}", "captions": captions}


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _valid_feature(path: Path, i2v: bool) -> bool:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:
        return False
    needed = {"video", "prompt_ids", "prompt_mask"} | ({"image_latents"} if i2v else set())
    return isinstance(data, dict) and needed <= set(data)


def extract(args, rank: int, world: int, device: torch.device) -> Counter:
    """Extract this rank's share of the rows; returns counts by outcome."""
    from mindspeed_mm.data import BadSampleError, build_dataset
    from mindspeed_mm.models.ae import StepVideoI2VProcessor, StepVideoVAE
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder

    data_cfg, model_cfg, tool_cfg = args.mm.data, args.mm.model, args.mm.tool
    param = data_cfg.dataset_param
    if param.dataset_type not in ("t2v", "i2v"):
        raise ArgumentError(f"{args.mm_data}: feature extraction reads raw videos; dataset_type must be 't2v' or "
                            f"'i2v', not {param.dataset_type!r}.")
    if model_cfg.ae is None or not model_cfg.text_encoder:
        raise ArgumentError(f"{args.mm_model}: feature extraction needs the 'ae' and 'text_encoder' sections.")
    tokenizers = param.tokenizer_config or model_cfg.tokenizer
    if not tokenizers:
        raise ArgumentError(f"{args.mm_data}: dataset_param.tokenizer_config (the two tokenizers) is missing.")
    i2v = param.dataset_type == "i2v" or model_cfg.ae.i2v_processor is not None
    save_root = Path(tool_cfg.sorafeature.save_path)
    features = save_root / "features"
    features.mkdir(parents=True, exist_ok=True)

    dataset = build_dataset(data_cfg, seed=args.seed)
    vae = StepVideoVAE.from_config(model_cfg.ae, device=device)
    encoder = StepVideoTextEncoder.from_configs(model_cfg.text_encoder, tokenizers, device=device)
    processor = StepVideoI2VProcessor() if i2v else None
    counts: Counter = Counter()
    written: List[dict] = []
    for index in range(rank, len(dataset), world):
        row = dataset.rows[index]
        name = feature_name(row.file)
        target = features / name
        if target.exists() and _valid_feature(target, i2v):
            counts["kept from an earlier run"] += 1
            written.append({"index": index, "row": _output_row(row, name)})
            continue
        try:
            sample = dataset.load(index)
        except BadSampleError as exc:
            counts[f"skipped: {exc.reason}"] += 1
            logger.warning("skipping line %d of %s: %s", row.line, dataset.manifest.source, exc)
            continue
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
        with torch.no_grad():
            video = sample["video"][None].to(device)
            latents = vae.encode(video, generator=generator)
            prompt, prompt_mask = encoder([sample["caption"]])
            out = {"video": latents[0].cpu(), "prompt_ids": [p.cpu() for p in prompt],
                   "prompt_mask": [m.cpu() for m in prompt_mask]}
            if processor is not None:
                out["image_latents"] = processor(vae, video, latents.shape[1], generator=generator)[0].cpu()
        _save_atomic(out, target)
        counts["extracted"] += 1
        written.append({"index": index, "row": _output_row(row, name)})
    part = save_root / f".data.rank{rank}.jsonl"
    with open(part, "w", encoding="utf-8") as handle:
        for item in written:
            handle.write(json.dumps(item, ensure_ascii=False) + "\n")
    return counts


def _merge_parts(save_root: Path, world: int) -> int:
    items = []
    for rank in range(world):
        part = save_root / f".data.rank{rank}.jsonl"
        with open(part, encoding="utf-8") as handle:
            items.extend(json.loads(line) for line in handle if line.strip())
        part.unlink()
    items.sort(key=lambda item: item["index"])
    tmp = save_root / ".data.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for item in items:
            handle.write(json.dumps(item["row"], ensure_ascii=False) + "\n")
    os.replace(tmp, save_root / "data.jsonl")
    return len(items)


def main(argv: Optional[List[str]] = None) -> int:
    import torch.distributed as dist

    from mindspeed_mm.runtime import current_device, destroy_runtime, initialize_runtime

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    args = parse_args(argv, entry="feature_extract")
    for name in ("data", "model", "tool"):
        if getattr(args.mm, name) is None:
            raise ArgumentError(f"feature extraction needs --mm-{name}.")
    if args.tensor_model_parallel_size != 1 or args.context_parallel_size != 1:
        raise ArgumentError("feature extraction runs data parallel only: set --tensor-model-parallel-size 1 and "
                            "--context-parallel-size 1 (TP and CP would repeat the same work).")
    owns_runtime = not dist.is_initialized()  # when called from a running job, leave its process group alone
    initialize_runtime(seed=args.seed, backend=args.distributed_backend,
                       timeout_minutes=args.distributed_timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    counts = extract(args, rank, world, current_device())
    totals = [None] * world
    dist.all_gather_object(totals, dict(counts))
    dist.barrier()
    if rank == 0:
        save_root = Path(args.mm.tool.sorafeature.save_path)
        rows = _merge_parts(save_root, world)
        merged = Counter()
        for part in totals:
            merged.update(part)
        summary = ", ".join(f"{v} {k}" for k, v in sorted(merged.items()))
        print(f"feature extraction: {rows} rows in {save_root / 'data.jsonl'} ({summary})", flush=True)
    dist.barrier()
    if owns_runtime:
        destroy_runtime()
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
