#!/bin/bash
# StepVideo t2v pretraining on extracted features. Set LOAD_PATH (a converted checkpoint, see docs/conversion.md),
# SAVE_PATH, and the paths in the JSON files below; then run from the repository root:
#   bash examples/stepvideo/t2v/pretrain_t2v.sh
# Any variable below can also be set in the environment (e.g. NPUS_PER_NODE=16 NNODES=2 NODE_RANK=1 ...).
set -o pipefail

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-8}}
source "$(dirname "${BASH_SOURCE[0]}")/../launch_env.sh"

TP=${TP:-8}
PP=1
VP=1
CP=${CP:-1}
MBS=${MBS:-1}
ACC=${ACC:-1}
GBS=$((WORLD_SIZE * MBS / CP / TP * ACC))

MM_DATA=${MM_DATA:-"./examples/stepvideo/t2v/data_static_resolution.json"}
MM_MODEL=${MM_MODEL:-"./examples/stepvideo/t2v/pretrain_t2v_model.json"}
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
    --recompute-num-layers 48 \
    --use-distributed-optimizer \
    --allow-tf32 \
    --num-workers ${NUM_WORKERS:-$(default_num_workers 8)} \
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

torchrun $DISTRIBUTED_ARGS pretrain_sora.py \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee "$LOG_DIR/train_${LOG_STAMP}.log"
status=$?

report_throughput "$LOG_DIR/train_${LOG_STAMP}.log" "$GBS"
exit $status
