#!/bin/bash
# Feature extraction (t2v): VAE latents + Step-LLM and HunyuanCLIP states, one .pt per video.
# Edit the JSON files below (paths of the data and weights; save_path in tools.json), then run from the repository
# root:  bash examples/stepvideo/feature_extract/feature_extraction.sh
# Any variable below can also be set in the environment (e.g. NPUS_PER_NODE=8, MM_DATA=my_data.json).
set -o pipefail

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-1}}
source "$(dirname "${BASH_SOURCE[0]}")/../launch_env.sh"

# Feature extraction is data parallel only: every process takes its share of the videos.
TP=1
PP=1
CP=1
MBS=1
GBS=$((WORLD_SIZE * MBS / CP))

MM_DATA=${MM_DATA:-"./examples/stepvideo/feature_extract/data.json"}
MM_MODEL=${MM_MODEL:-"./examples/stepvideo/feature_extract/model_stepvideo.json"}
MM_TOOL=${MM_TOOL:-"./examples/stepvideo/feature_extract/tools.json"}

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --num-workers ${NUM_WORKERS:-$(default_num_workers 8)} \
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL \
    --mm-tool $MM_TOOL
"

torchrun $DISTRIBUTED_ARGS ./mindspeed_mm/tools/feature_extraction/get_sora_feature.py \
    $GPT_ARGS \
    $MM_ARGS \
    --distributed-backend nccl 2>&1 | tee "$LOG_DIR/feature_t2v_${LOG_STAMP}.log"
