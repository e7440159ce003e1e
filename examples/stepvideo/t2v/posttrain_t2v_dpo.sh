#!/bin/bash
# StepVideo t2v DPO post-training on preference pairs (docs/dpo.md). Set LOAD_PATH (a converted checkpoint),
# SAVE_PATH, data_dpo.json (the pairs from histgram_generator.py) and posttrain_t2v_model.json (weights paths and
# dpo.histogram_path); then run from the repository root:
#   bash examples/stepvideo/t2v/posttrain_t2v_dpo.sh
# Any variable below can also be set in the environment (e.g. NPUS_PER_NODE=16 NNODES=2 NODE_RANK=1 ...).
set -o pipefail

# Ascend: CANN environment (skipped where it is not installed, e.g. on GPU or CPU machines).
ASCEND_ENV=${ASCEND_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
[ -f "$ASCEND_ENV" ] && source "$ASCEND_ENV"
# Only read by Megatron-core on CUDA; harmless elsewhere.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export MULTI_STREAM_MEMORY_REUSE=${MULTI_STREAM_MEMORY_REUSE:-1}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}
export ASCEND_LAUNCH_BLOCKING=${ASCEND_LAUNCH_BLOCKING:-0}

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-1}}
MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))

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

logfile=$(date +%Y%m%d)_$(date +%H%M%S)
mkdir -p "$LOG_DIR"
torchrun $DISTRIBUTED_ARGS posttrain_sora_dpo.py \
    $GPT_ARGS \
    $MM_ARGS \
    $OUTPUT_ARGS \
    --distributed-backend nccl \
    2>&1 | tee "$LOG_DIR/dpo_${logfile}.log"
status=$?

STEP_TIME=`grep "elapsed time per iteration" "$LOG_DIR/dpo_${logfile}.log" | awk -F ':' '{print$5}' | awk -F '|' '{print$1}' | head -n 200 | tail -n 100 | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}'`
if [ -n "$STEP_TIME" ]; then
    PERF=`awk 'BEGIN{printf "%.3f\n", '${GBS}'*1000/'${STEP_TIME}'}'`
    echo "Elapsed Time Per iteration: $STEP_TIME, Average Samples per Second: $PERF"
fi
exit $status
