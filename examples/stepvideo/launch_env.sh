# Shared by the StepVideo launchers (sourced, not run): the Ascend environment where it is installed, the node
# layout and torchrun's arguments, the log file name, the default DataLoader worker count and the guide's throughput
# summary. Set NPUS_PER_NODE (or GPUS_PER_NODE), NNODES, NODE_RANK, MASTER_ADDR and MASTER_PORT in the launcher or the
# environment before sourcing. Several nodes: docs/multinode.md.

# Ascend: CANN environment (skipped where it is not installed, e.g. on GPU or CPU machines).
ASCEND_ENV=${ASCEND_ENV:-/usr/local/Ascend/ascend-toolkit/set_env.sh}
[ -f "$ASCEND_ENV" ] && source "$ASCEND_ENV"
# Read by Megatron-core on CUDA; the rest by CANN / torch_npu on Ascend. Harmless elsewhere.
export CUDA_DEVICE_MAX_CONNECTIONS=1
export ASCEND_SLOG_PRINT_TO_STDOUT=${ASCEND_SLOG_PRINT_TO_STDOUT:-0}
export ASCEND_GLOBAL_LOG_LEVEL=${ASCEND_GLOBAL_LOG_LEVEL:-3}
export TASK_QUEUE_ENABLE=${TASK_QUEUE_ENABLE:-1}
export COMBINED_ENABLE=${COMBINED_ENABLE:-1}
export CPU_AFFINITY_CONF=${CPU_AFFINITY_CONF:-1}
export HCCL_CONNECT_TIMEOUT=${HCCL_CONNECT_TIMEOUT:-1200}
export MULTI_STREAM_MEMORY_REUSE=${MULTI_STREAM_MEMORY_REUSE:-1}
export PYTORCH_NPU_ALLOC_CONF=${PYTORCH_NPU_ALLOC_CONF:-expandable_segments:True}

MASTER_ADDR=${MASTER_ADDR:-localhost}
MASTER_PORT=${MASTER_PORT:-6000}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
WORLD_SIZE=$((NPUS_PER_NODE * NNODES))
LOG_DIR=${LOG_DIR:-logs}
mkdir -p "$LOG_DIR"
LOG_STAMP=$(date +%Y%m%d)_$(date +%H%M%S)
# Several nodes often share the repository folder (and so LOG_DIR): one log file per node, not one that they all
# truncate and write at once.
if [ "$NNODES" -gt 1 ]; then LOG_STAMP="${LOG_STAMP}_node${NODE_RANK}"; fi

DISTRIBUTED_ARGS="
    --nproc_per_node $NPUS_PER_NODE \
    --nnodes $NNODES \
    --node_rank $NODE_RANK \
    --master_addr $MASTER_ADDR \
    --master_port $MASTER_PORT
"

# default_num_workers N: the launcher's default DataLoader worker count N (per process), lowered to this node's share
# of cores per process (cores / NPUS_PER_NODE, at least 1) when the node has fewer, with a notice on stderr. Cores are
# those this shell may run on (nproc honours taskset/cpusets; OMP_* variables are ignored for the count), else
# getconf's online count, else N unchanged. The launchers use it only when NUM_WORKERS is not set:
#     --num-workers ${NUM_WORKERS:-$(default_num_workers 8)}
default_num_workers() {
    local want=$1 per=${NPUS_PER_NODE:-1} cores share
    case "$per" in ''|*[!0-9]*|0) per=1 ;; esac
    cores=$(env -u OMP_NUM_THREADS -u OMP_THREAD_LIMIT nproc 2>/dev/null \
        || getconf _NPROCESSORS_ONLN 2>/dev/null || echo "")
    case "$cores" in ''|*[!0-9]*|0) echo "$want"; return ;; esac
    share=$((cores / per))
    [ "$share" -lt 1 ] && share=1
    if [ "$want" -gt "$share" ]; then
        echo "notice: --num-workers $share (the launcher's default $want, lowered to the $cores core(s) of this node" \
            "shared by $per process(es); set NUM_WORKERS to choose)" >&2
        echo "$share"
    else
        echo "$want"
    fi
}

# report_throughput LOG GBS: the guide's summary, averaged over iterations 101-200 of the log (or what there is).
report_throughput() {
    local step_time
    step_time=$(grep "elapsed time per iteration" "$1" | awk -F ':' '{print$5}' | awk -F '|' '{print$1}' \
        | head -n 200 | tail -n 100 | awk '{sum+=$1} END {if (NR != 0) printf("%.1f",sum/NR)}')
    if [ -n "$step_time" ]; then
        echo "Elapsed Time Per iteration: $step_time, Average Samples per Second: $(awk 'BEGIN{printf "%.3f\n", '"$2"'*1000/'"$step_time"'}')"
    fi
}
