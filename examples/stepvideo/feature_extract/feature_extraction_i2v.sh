#!/bin/bash
# Feature extraction (i2v): VAE latents + Step-LLM and HunyuanCLIP states, one .pt per video.
# Edit the JSON files below (paths of the data and weights; save_path in tools.json), then run from the repository
# root:  bash examples/stepvideo/feature_extract/feature_extraction_i2v.sh
# Any variable below can also be set in the environment (e.g. NPUS_PER_NODE=8, MM_DATA=my_data.json).
set -o pipefail

# Ascend: CANN environment (skipped where it is not installed, e.g. on GPU or CPU machines).
ASCEND_ENV=${ASCEND_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
[ -f "$ASCEND_ENV" ] && source "$ASCEND_ENV"
export CUDA_DEVICE_MAX_CONNECTIONS=1
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-1}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

# Feature extraction is data parallel only: every process takes its share of the videos.
TP=1
PP=1
CP=1
MBS=1
GBS=$((WORLD_SIZE * MBS / CP))

MM_DATA=${MM_DATA:-"./examples/stepvideo/feature_extract/data_i2v.json"}
MM_MODEL=${MM_MODEL:-"./examples/stepvideo/feature_extract/model_stepvideo_i2v.json"}
MM_TOOL=${MM_TOOL:-"./examples/stepvideo/feature_extract/tools.json"}
LOG_DIR=${LOG_DIR:-logs}

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --num-workers ${NUM_WORKERS:-8} \
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL \
    --mm-tool $MM_TOOL
"

logfile=$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS ./mindspeed_mm/tools/feature_extraction/get_sora_feature.py \
    $GPT_ARGS \
    $MM_ARGS \
    --distributed-backend nccl 2>&1 | tee "$LOG_DIR/feature_i2v_${logfile}.log"
