#!/bin/bash
# StepVideo t2v DPO post-training on preference pairs (docs/dpo.md). Set LOAD_PATH (a converted checkpoint),
# SAVE_PATH, data_dpo.json (the pairs from histgram_generator.py) and posttrain_t2v_model.json (weights paths and
# dpo.histogram_path); then run from the repository root:
#   bash examples/stepvideo/t2v/posttrain_t2v_dpo.sh
# Any variable below can also be set in the environment (e.g. NPUS_PER_NODE=16 NNODES=2 NODE_RANK=1 ...).
set -o pipefail

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-1}}
source "$(dirname "${BASH_SOURCE[0]}")/../launch_env.sh"
export ASCEND_LAUNCH_BLOCKING=${ASCEND_LAUNCH_BLOCKING:-0}

TP=${TP:-1}
PP=1
VP=1
CP=${CP:-1}
MBS=${MBS:-1}
ACC=${ACC:-1}
GBS=$((WORLD_SIZE * MBS / CP / TP * ACC))

MM_DATA=${MM_DATA:-"./examples/stepvideo/t2v/data_dpo.json"}
MM_MODEL=${MM_MODEL:-"./examples/stepvideo/t2v/posttrain_t2v_model.json"}
MM_TOOL=${MM_TOOL:-"./mindspeed_mm/tools/tools.json"}
LOAD_PATH=${LOAD_PATH:-"your_converted_dit_ckpt_dir"}
SAVE_PATH=${SAVE_PATH:-"your_ckpt_path_to_save"}
TRAIN_ITERS=${TRAIN_ITERS:-5000}
SAVE_INTERVAL=${SAVE_INTERVAL:-10000}

GPT_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --virtual-pipeline-model-parallel-size ${VP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --lr 1e-5 \
    --min-lr 1e-5 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --adam-eps 1e-15 \
    --lr-decay-style constant \
    --weight-decay 1e-2 \
    --lr-warmup-init 1e-5 \
    --lr-warmup-iters 0 \
    --clip-grad 1.0 \
    --train-iters ${TRAIN_ITERS} \
    --no-gradient-accumulation-fusion \
    --load $LOAD_PATH \
    --bf16 \
    --recompute-granularity full \
    --recompute-method block \
    --recompute-num-layers 32 \
    --use-distributed-optimizer \
    --allow-tf32 \
    --num-workers ${NUM_WORKERS:-0} \
"

MM_ARGS="
    --mm-data $MM_DATA \
    --mm-model $MM_MODEL \
    --mm-tool $MM_TOOL
"

OUTPUT_ARGS="
    --log-interval 1 \
    --save-interval ${SAVE_INTERVAL} \
    --eval-interval 10000 \
    --eval-iters 10 \
    --save $SAVE_PATH \
    --ckpt-format torch \
"

torchrun $DISTRIBUTED_ARGS posttrain_dpo.py \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee "$LOG_DIR/dpo_${LOG_STAMP}.log"
status=$?

report_throughput "$LOG_DIR/dpo_${LOG_STAMP}.log" "$GBS"
exit $status
