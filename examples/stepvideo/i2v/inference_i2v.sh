#!/bin/bash
# StepVideo image-to-video inference (推理).
# Set LOAD_PATH to the converted DiT checkpoint (the folder holding latest_checkpointed_iteration.txt, written by
# examples/stepvideo/convert_ckpt_to_mm.py with --tp_size equal to TP below), edit the weight paths, prompt file and
# save_path in the model JSON, put one image path per prompt in the image list (samples_i2v_images.txt lists the
# shipped sample first_frame.png for the shipped prompt; replace both with your own), then run from the repository root:
#     bash examples/stepvideo/i2v/inference_i2v.sh
# Any variable below can be set in the environment instead, e.g. LOAD_PATH=./StepVideo-Converted NPUS_PER_NODE=8.
# Outputs: save_path/video_{i}.mp4 (i = prompt_index * num_inference_videos_per_sample + k) and video_grid.mp4.
set -o pipefail

NPUS_PER_NODE=${NPUS_PER_NODE:-${GPUS_PER_NODE:-4}}
source "$(dirname "${BASH_SOURCE[0]}")/../launch_env.sh"

# TP x CP ranks work on the same videos; WORLD_SIZE / (TP x CP) data-parallel groups share the prompts.
TP=${TP:-4}
PP=1
CP=${CP:-1}
MBS=${MBS:-1}
GBS=$((WORLD_SIZE * MBS / CP / TP))

MM_MODEL=${MM_MODEL:-"examples/stepvideo/i2v/inference_i2v_model.json"}
LOAD_PATH=${LOAD_PATH:-"your_converted_dit_ckpt_dir"}

MM_ARGS="
    --mm-model $MM_MODEL
"

# lr, iterations and Adam settings are accepted for compatibility with the seed and unused by inference.
SORA_ARGS="
    --tensor-model-parallel-size ${TP} \
    --pipeline-model-parallel-size ${PP} \
    --context-parallel-size ${CP} \
    --context-parallel-algo ulysses_cp_algo \
    --micro-batch-size ${MBS} \
    --global-batch-size ${GBS} \
    --lr 2e-5 \
    --min-lr 2e-5 \
    --train-iters 5010 \
    --weight-decay 0 \
    --clip-grad 1 \
    --adam-beta1 0.9 \
    --adam-beta2 0.999 \
    --no-gradient-accumulation-fusion \
    --no-load-optim \
    --no-load-rng \
    --no-save-optim \
    --no-save-rng \
    --bf16 \
    --seed ${SEED:-1234} \
    --load $LOAD_PATH \
    --distributed-timeout-minutes 20 \
"

torchrun $DISTRIBUTED_ARGS inference_sora.py \
    $MM_ARGS \
    $SORA_ARGS 2>&1 | tee "$LOG_DIR/inference_i2v_${LOG_STAMP}.log"
