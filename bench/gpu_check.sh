#!/usr/bin/env bash
# The GPU check of issue 25, in one go on one H100/H200 (under 8 minutes): the JSON lines of
# bench/gpu.py on Llama-2-7B's shape and of bench/corpus.py on Llama-3.1-8B's and SmolLM2's
# shapes (random weights: no download), each prefixed by the command that printed it.
#
#     bench/gpu_check.sh                      # on a CUDA GPU
#     NEURONMAP_GPU_CHECK=tiny bench/gpu_check.sh   # tiny shapes on the CPU: checks the script runs
#
# Each bench runs under its own time limit, so that one stuck bench cannot take the others'
# minutes; a bench that fails or runs out of time prints {"bench": ..., "error": ...} instead.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1

if [[ "${NEURONMAP_GPU_CHECK:-}" == tiny ]]; then
    runs=(
        "600 bench/gpu.py --smoke"
        "600 bench/corpus.py --device cpu --random-config bench/configs/tiny-llama.json --dtype float32 --contexts 32 --repeats 1"
    )
else
    runs=(
        "300 bench/gpu.py --prompts 128 --test-prompts 32 --repeats 2"
        "120 bench/corpus.py --device cuda --random-config bench/configs/llama-3.1-8b.json --dtype bfloat16 --contexts 128 --repeats 2"
        "60 bench/corpus.py --device cuda --random-config bench/configs/smollm2-135m.json --dtype bfloat16 --contexts 512 --repeats 2"
    )
fi

status=0
log=$(mktemp)
for run in "${runs[@]}"; do
    limit=${run%% *}
    command=${run#* }
    echo "# $command" >&2
    start=$SECONDS
    if line=$(timeout "$limit" $PYTHON $command 2>"$log" | tail -n 1) && [[ "$line" == \{* ]]; then
        echo "$line"
    else
        status=1
        tail -n 5 "$log" >&2
        echo "{\"bench\": \"${command%% *}\", \"command\": \"$command\", \"error\": \"failed or over ${limit} s\"}"
    fi
    echo "# $((SECONDS - start)) s" >&2
done
rm -f "$log"
exit $status
