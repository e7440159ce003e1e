"""Feature extraction (特征提取): VAE latents and both text encoders' states, one .pt file per video.

    bash examples/stepvideo/feature_extract/feature_extraction.sh       # t2v
    bash examples/stepvideo/feature_extract/feature_extraction_i2v.sh   # i2v (adds image_latents)

or directly, with the launchers' flags:

    torchrun --nproc_per_node N mindspeed_mm/tools/feature_extraction/get_sora_feature.py \
        --tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --context-parallel-size 1 \
        --micro-batch-size 1 --global-batch-size N --mm-data data.json --mm-model model.json --mm-tool tools.json

Output, under `sorafeature.save_path` of the tools JSON:

    data.jsonl                 one line per kept row: the source row with "file" = "features/<name>.pt" (and, for a
                               DPO row, "file_rejected" = the loser's .pt, "score" and "score_rejected")
    features/<name>.pt         torch.save({"video": latents (t, z, h, w),
                                           "prompt_ids": [llm states (1, L1, C1), clip states (1, L2, C2)],
                                           "prompt_mask": [(1, L1), (1, L2)] int64,
                                           "image_latents": (t, z, h, w),   # i2v only
                                           "extracted_from": {"file", "caption", frame settings}})
    (with the tools JSON's sorafeature.all_captions, a row's every caption: prompt_ids (N, L, C), masks (N, L);
    training draws one per epoch)
    empty_prompt.pt            torch.save({"prompt_ids": [...], "prompt_mask": [...]}) of the empty prompt "",
                               encoded as every caption is: caption dropout trains some samples on it

Every rank reads the whole manifest and makes the same plan before extracting anything (`plan_extraction`): each
distinct video (by its normalised path) is extracted once, under a name that no other video can get (`feature_name`:
a readable stem plus a hash of the path), and rows that would reuse a video wrongly are skipped and counted. A .pt
left by an earlier run is kept only when its `extracted_from` record matches what this run would write; otherwise it is
extracted again. data.jsonl lists only rows whose videos were all written, in manifest order, after extraction
(MindSpeed-MM writes it first and leaves dangling entries). Videos are split over all ranks (data parallel); each .pt
is written to a temporary name and renamed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import posixpath
import re
import sys
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

if __package__ in (None, ""):  # run as a script (the seed's launchers do): make the package importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from mindspeed_mm.arguments import ArgumentError, parse_args  # noqa: E402
from mindspeed_mm.data.datasets import RECORD_KEY  # noqa: E402
from mindspeed_mm.data.manifest import ManifestRow, choose_caption, data_root, format_lines, is_inside  # noqa: E402

logger = logging.getLogger("mindspeed_mm.feature_extraction")

MAX_STEM = 80  # readable part of a feature name; the hash keeps names unique, the limit keeps them legal
HASH_CHARS = 16  # 64 bits: no accidental collision at any dataset size (and plan_extraction checks anyway)


def source_key(path: str, root: str) -> str:
    """A video's identity: its path relative to `root` (posix separators, `.`/`..` resolved) when inside it, else
    its absolute path. `./videos/a.mp4`, `videos//a.mp4` and `<root>/videos/a.mp4` are one video."""
    full = os.path.abspath(path)
    rel = os.path.relpath(full, root) if is_inside(full, root) else full
    return Path(rel).as_posix()


def feature_name(key: str) -> str:
    """'videos/a/1.mp4' -> 'videos_a_1_mp4-<16 hex>.pt'. The stem is readable and length-limited; the hash of the
    normalised path makes the name injective (`videos/a_b.mp4`, `videos/a/b.mp4` and `videos/a.b.mp4` share a stem,
    not a name)."""
    key = posixpath.normpath(key.replace("\\", "/"))
    stem = re.sub(r"[^0-9A-Za-z_-]+", "_", key).strip("_")[:MAX_STEM].rstrip("_") or "video"
    return f"{stem}-{hashlib.sha256(key.encode('utf-8')).hexdigest()[:HASH_CHARS]}.pt"


@dataclass
class PlannedVideo:
    key: str        # source_key of the video
    path: str       # where to read it
    name: str       # features/<name>
    caption: str    # the caption encoded into its .pt (the first, with all_captions)
    line: int       # the first manifest line that needs it
    captions: Tuple[str, ...] = ()  # with all_captions: every caption of the row, all encoded


@dataclass
class PlannedRow:
    row: ManifestRow
    video: int                  # index into Plan.videos
    rejected: Optional[int]     # DPO rows: the loser's index


@dataclass
class Plan:
    videos: List[PlannedVideo] = field(default_factory=list)
    rows: List[PlannedRow] = field(default_factory=list)
    skipped: "OrderedDict[str, List[int]]" = field(default_factory=OrderedDict)  # reason -> lines
    notes: List[str] = field(default_factory=list)  # one explanation per skipped row

    def skip(self, reason: str, line: int, note: str) -> None:
        self.skipped.setdefault(reason, []).append(line)
        self.notes.append(f"line {line}: {note}")


def plan_extraction(rows: Sequence[ManifestRow], root: str, seed: int, all_captions: bool = False) -> Plan:
    """Which videos to extract, under which names, and which rows to write: identical on every rank.

    A video is extracted once, for the first row that needs it, with that row's caption (with `all_captions`, with
    all of them). Skipped rows:
    - "duplicate video": a non-DPO row whose video an earlier row has (put all captions of one video in its row's
      `captions` list);
    - "duplicate pair": a DPO row with the winner and loser of an earlier row;
    - "winner and loser are one video": a DPO row whose two paths are one file;
    - "video extracted with another caption": a DPO row whose winner an earlier row needs with another caption (the
      winner's .pt holds the text states of the pair's prompt; a loser's .pt is only used for its latents);
    - "feature name collision": two videos with one name (a 64-bit hash collision; never expected).
    """
    plan = Plan()
    index_of: Dict[str, int] = {}
    owner: Dict[str, str] = {}      # feature name -> key
    pairs: Dict[Tuple[str, str], int] = {}
    for index, row in enumerate(rows):
        caption = choose_caption(row.captions, seed, index) if row.captions else ""
        wkey = source_key(row.path, root)
        lkey = source_key(row.path_rejected, root) if row.is_dpo else None
        if not row.is_dpo and wkey in index_of:
            first = plan.videos[index_of[wkey]]
            plan.skip("duplicate video", row.line, f"{row.file} is the video of line {first.line}, which is "
                                                   f"extracted once; keep one row per video.")
            continue
        if row.is_dpo:
            if wkey == lkey:
                plan.skip("winner and loser are one video", row.line, f"file and file_rejected are both {wkey}.")
                continue
            if (wkey, lkey) in pairs:
                plan.skip("duplicate pair", row.line, f"the same pair as line {pairs[(wkey, lkey)]}.")
                continue
            if wkey in index_of and plan.videos[index_of[wkey]].caption != caption:
                first = plan.videos[index_of[wkey]]
                plan.skip("video extracted with another caption", row.line,
                          f"the chosen video {row.file} is extracted for line {first.line} with the caption "
                          f"{first.caption[:60]!r}, not this row's {caption[:60]!r}.")
                continue
        new = [(k, p) for k, p in ((wkey, row.path), (lkey, row.path_rejected)) if k is not None and k not in index_of]
        clash, mine = None, {}
        for key, _ in new:
            name = feature_name(key)
            other = owner.get(name) or mine.setdefault(name, key)
            if other != key:
                clash = f"{key} and {other} map to {name}."
        if clash:
            plan.skip("feature name collision", row.line, clash)
            continue
        for key, path in new:
            index_of[key] = len(plan.videos)
            owner[feature_name(key)] = key
            every = tuple(row.captions) if all_captions and len(row.captions) > 1 and key == wkey else ()
            plan.videos.append(PlannedVideo(key, path, feature_name(key), every[0] if every else caption, row.line,
                                            every))
        if row.is_dpo:
            pairs[(wkey, lkey)] = row.line
        plan.rows.append(PlannedRow(row, index_of[wkey], index_of[lkey] if lkey is not None else None))
    return plan


def record_of(video: PlannedVideo, preprocess) -> dict:
    """What a .pt is made from; a file whose record differs is stale and extracted again."""
    frames = {k: getattr(preprocess, k) for k in ("num_frames", "train_fps", "skip_frame_num", "max_height",
                                                  "max_width")}
    text = {"captions": list(video.captions)} if video.captions else {"caption": video.caption}
    return {"file": video.key, **text, **frames}


def _output_row(row: ManifestRow, name: str, rejected: Optional[str]) -> dict:
    captions = row.captions[0] if len(row.captions) == 1 else list(row.captions)
    out = {**row.extra, "file": f"features/{name}", "captions": captions}
    if row.is_dpo:
        out.update(file_rejected=f"features/{rejected}", score=row.score, score_rejected=row.score_rejected)
    return out


def _save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def _reusable(path: Path, i2v: bool, record: dict) -> bool:
    """True when `path` holds the keys this run needs and was made from the same video, caption and settings."""
    try:  # mmap: reads the pickle and the record, not the tensors (tens of MB per file at full size)
        data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        return False
    needed = {"video", "prompt_ids", "prompt_mask"} | ({"image_latents"} if i2v else set())
    return isinstance(data, dict) and needed <= set(data) and data.get(RECORD_KEY) == record


class _Clips(torch.utils.data.Dataset):
    """Decodes this rank's videos, in DataLoader workers when --num-workers > 0."""

    def __init__(self, dataset, videos: List[PlannedVideo], todo: List[int]):
        self.dataset, self.videos, self.todo = dataset, videos, todo

    def __len__(self) -> int:
        return len(self.todo)

    def __getitem__(self, k: int):
        from mindspeed_mm.data import BadSampleError

        j = self.todo[k]
        try:
            return j, self.dataset.read_clip(self.videos[j].path), None
        except BadSampleError as exc:
            return j, None, (exc.reason, str(exc))


def _as_is(item):
    return item


def extract(args, rank: int, world: int, device: torch.device, plan: Plan, dataset) -> Tuple[Counter, Dict[int, str]]:
    """Extract this rank's share of the planned videos; returns (counts by outcome, {video index: failure reason})."""
    from mindspeed_mm.models.ae import StepVideoI2VProcessor, StepVideoVAE
    from mindspeed_mm.models.text_encoder import StepVideoTextEncoder

    data_cfg, model_cfg = args.mm.data, args.mm.model
    param = data_cfg.dataset_param
    tokenizers = param.tokenizer_config or model_cfg.tokenizer
    i2v = param.dataset_type == "i2v" or model_cfg.ae.i2v_processor is not None
    features = Path(args.mm.tool.sorafeature.save_path) / "features"
    counts: Counter = Counter()
    failures: Dict[int, str] = {}
    todo = []
    for j in range(rank, len(plan.videos), world):
        target = features / plan.videos[j].name
        if target.exists() and _reusable(target, i2v, record_of(plan.videos[j], param.preprocess_parameters)):
            counts["kept from an earlier run"] += 1
        else:
            todo.append(j)
    if not todo:
        return counts, failures
    vae = StepVideoVAE.from_config(model_cfg.ae, device=device)
    encoder = StepVideoTextEncoder.from_configs(model_cfg.text_encoder, tokenizers, device=device,
                                                layerwise_offload=model_cfg.text_encoder_layerwise_offload)
    if rank == 0:
        write_empty_prompt(encoder, features.parent)
    processor = StepVideoI2VProcessor() if i2v else None
    loader = torch.utils.data.DataLoader(_Clips(dataset, plan.videos, todo), batch_size=None, collate_fn=_as_is,
                                         num_workers=args.num_workers)
    from tqdm import tqdm

    # Rank 0's share stands for the job's progress (every rank has about as many videos).
    progress = tqdm(loader, total=len(todo), unit="video", disable=rank != 0,
                    desc=f"feature extraction (rank 0 of {world})")
    for j, clip, failure in progress:
        video = plan.videos[j]
        if failure is not None:
            failures[j] = failure[0]
            counts[f"skipped: {failure[0]}"] += 1
            logger.warning("skipping %s (line %d of %s): %s", video.path, video.line, dataset.manifest.source,
                           failure[1])
            continue
        generator = torch.Generator().manual_seed(args.seed * 1_000_003 + j)
        with torch.no_grad():
            pixels = clip[None].to(device)
            latents = vae.encode(pixels, generator=generator)
            prompt, prompt_mask = encoder(list(video.captions) or [video.caption])  # (N, L, C): N captions
            out = {"video": latents[0].cpu(), "prompt_ids": [p.cpu() for p in prompt],
                   "prompt_mask": [m.cpu() for m in prompt_mask],
                   RECORD_KEY: record_of(video, param.preprocess_parameters)}
            if processor is not None:  # each video's own first frame, also for the loser of a DPO pair
                out["image_latents"] = processor(vae, pixels, latents.shape[1], generator=generator)[0].cpu()
        target = features / video.name
        counts["re-extracted over a stale file" if target.exists() else "extracted"] += 1
        _save_atomic(out, target)
    return counts, failures


def write_empty_prompt(encoder, save_root: Path) -> Path:
    """The empty prompt's states, encoded as every caption is, for caption dropout in training (EMPTY_PROMPT_FILE)."""
    from mindspeed_mm.config.data import EMPTY_PROMPT_FILE

    with torch.no_grad():
        prompt, prompt_mask = encoder([""])
    target = save_root / EMPTY_PROMPT_FILE
    _save_atomic({"prompt_ids": [p.cpu() for p in prompt], "prompt_mask": [m.cpu() for m in prompt_mask]}, target)
    return target


def write_rows(save_root: Path, plan: Plan, failures: Dict[int, str]) -> Tuple[int, List[int]]:
    """Write data.jsonl (the rows whose videos were all written, in manifest order); returns (rows written, lines of
    DPO rows left out because one of their videos failed)."""
    written, dropped_pairs = 0, []
    tmp = save_root / ".data.jsonl.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        for planned in plan.rows:
            ids = [planned.video] + ([planned.rejected] if planned.rejected is not None else [])
            if any(i in failures for i in ids):
                if planned.row.is_dpo:
                    dropped_pairs.append(planned.row.line)
                continue
            rejected = plan.videos[planned.rejected].name if planned.rejected is not None else None
            out = _output_row(planned.row, plan.videos[planned.video].name, rejected)
            handle.write(json.dumps(out, ensure_ascii=False) + "\n")
            written += 1
    os.replace(tmp, save_root / "data.jsonl")
    return written, dropped_pairs


def _check_config(args) -> None:
    data_cfg, model_cfg = args.mm.data, args.mm.model
    param = data_cfg.dataset_param
    if param.dataset_type not in ("t2v", "i2v"):
        raise ArgumentError(f"{args.mm_data}: feature extraction reads raw videos; dataset_type must be 't2v' or "
                            f"'i2v', not {param.dataset_type!r}.")
    if model_cfg.ae is None or not model_cfg.text_encoder:
        raise ArgumentError(f"{args.mm_model}: feature extraction needs the 'ae' and 'text_encoder' sections.")
    if not (param.tokenizer_config or model_cfg.tokenizer):
        raise ArgumentError(f"{args.mm_data}: dataset_param.tokenizer_config (the two tokenizers) is missing.")


def main(argv: Optional[List[str]] = None) -> int:
    import torch.distributed as dist

    from mindspeed_mm.cli import configure_logging
    from mindspeed_mm.config.data import EMPTY_PROMPT_FILE
    from mindspeed_mm.data import build_dataset
    from mindspeed_mm.runtime import current_device, destroy_runtime, initialize_runtime

    configure_logging()  # no-op under cli.run, which configured it already
    args = parse_args(argv, entry="feature_extract")
    for name in ("data", "model", "tool"):
        if getattr(args.mm, name) is None:
            raise ArgumentError(f"feature extraction needs --mm-{name}.")
    if args.tensor_model_parallel_size != 1 or args.context_parallel_size != 1:
        raise ArgumentError("feature extraction runs data parallel only: set --tensor-model-parallel-size 1 and "
                            "--context-parallel-size 1 (TP and CP would repeat the same work).")
    _check_config(args)
    owns_runtime = not dist.is_initialized()  # when called from a running job, leave its process group alone
    initialize_runtime(seed=args.seed, backend=args.distributed_backend,
                       timeout_minutes=args.distributed_timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    save_root = Path(args.mm.tool.sorafeature.save_path)
    (save_root / "features").mkdir(parents=True, exist_ok=True)
    dataset = build_dataset(args.mm.data, seed=args.seed)  # logs the manifest summary on rank 0
    plan = plan_extraction(dataset.rows, data_root(args.mm.data.dataset_param.basic_parameters.data_folder),
                           args.seed, all_captions=args.mm.tool.sorafeature.all_captions)
    if rank == 0 and plan.notes:
        summary = ", ".join(f"{len(lines)} {reason} ({format_lines(lines)})" for reason, lines in plan.skipped.items())
        more = f" (and {len(plan.notes) - 10} more)" if len(plan.notes) > 10 else ""
        logger.warning("feature extraction leaves out %d rows of %s: %s\n  %s%s", len(plan.notes),
                       dataset.manifest.source, summary, "\n  ".join(plan.notes[:10]), more)
    counts, failures = extract(args, rank, world, current_device(), plan, dataset)
    if rank == 0 and not (save_root / EMPTY_PROMPT_FILE).is_file():  # everything was kept from an earlier run
        from mindspeed_mm.models.text_encoder import StepVideoTextEncoder

        param = args.mm.data.dataset_param
        write_empty_prompt(StepVideoTextEncoder.from_configs(
            args.mm.model.text_encoder, param.tokenizer_config or args.mm.model.tokenizer, device=current_device(),
            layerwise_offload=args.mm.model.text_encoder_layerwise_offload), save_root)
    results = [None] * world
    dist.all_gather_object(results, (dict(counts), failures))
    if rank == 0:
        merged, failed = Counter(), {}
        for part_counts, part_failures in results:
            merged.update(part_counts)
            failed.update(part_failures)
        rows, dropped = write_rows(save_root, plan, failed)
        left_out = [f"{len(lines)} {reason} ({format_lines(lines)})" for reason, lines in plan.skipped.items()]
        if dropped:
            left_out.append(f"{len(dropped)} pairs with a failed video ({format_lines(dropped)})")
        summary = ", ".join(f"{v} {k}" for k, v in sorted(merged.items()))
        rest = f"; rows left out: {', '.join(left_out)}" if left_out else ""
        print(f"feature extraction: {rows} rows in {save_root / 'data.jsonl'} (videos: {summary}){rest}", flush=True)
    dist.barrier()
    if owns_runtime:
        destroy_runtime()
    return 0


if __name__ == "__main__":
    from mindspeed_mm.cli import run

    sys.exit(run(main))
