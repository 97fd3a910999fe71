#!/usr/bin/env bash
# The GPU measurements and checks, in order of importance, each bounded in time, into one log.
#
#   bash benchmarks/gpu.sh                 # everything that fits in $GPU_BUDGET_S seconds (540)
#   bash benchmarks/gpu.sh bench compile   # only the named steps
#
# Steps: losstests (tests/test_cuda.py's fused-loss tests: the CUDA route of our loss, its softmax
# chunks in a Triton kernel and its weight gradient summed by a mixed-precision addmm, against the plain
# route), syncs (the training steps of tests/test_cuda.py run under CUDA's sync debug mode: a
# failure names the op that makes the host wait), kernels (benchmarks/kernels.py: our RMSNorm,
# SwiGLU and fused loss against Liger-Kernel's, and our loss by route), bench (llama-base, ~124M,
# seq 1024, bf16, eager, against transformers), compile (bench with both models compiled, and the
# top ops of a profile), fit (`scratchlm fit` of the same model in bf16-mixed: the tokens/s and
# MFU training logs, loop and data loader included, on the corpus prepared by `scratchlm
# prepare`; then the bare steps of that model against HF's), eagerloss (bench with our loss's
# softmax chunks eager, as without the Triton kernel), tests (the rest of tests/test_cuda.py:
# FlexAttention forward and backward against the dense mask, Liger's SwiGLU, a mixed-precision
# fit on the GPU), docs (bench with 4 packed documents per block: FlexAttention in ours),
# families (gpt2 and bert base).
# The fit reads $FIT_CORPUS (default: the built-in corpus, small enough to end an epoch every few
# steps); to take a real corpus along to a device machine, copy one into an ignored folder of the
# repository (e.g. .corpus/, listed in .git/info/exclude), carry that folder, and set FIT_CORPUS.
# Steps run in the order above, whatever order they are named in; a step starts only if its time
# limit fits in what is left of the budget. The log goes to
# $OUT/gpu.log when OUT is set, else to gpu.log in the current folder. Runs without installing:
# the package comes from src/ (PYTHONPATH), the machine's own torch and transformers are used.
# Packages the machine lacks (jsonargparse and its two helpers for the CLI, liger-kernel for the
# kernels step) travel as wheels in .whl/ (an ignored folder) and go to a scratch site folder.
set -u
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl &&
        export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LOG=${OUT:-.}/gpu.log
BUDGET=${GPU_BUDGET_S:-540}
START=$SECONDS
WANTED=" ${*:-losstests syncs kernels bench compile fit eagerloss tests docs families} "
LLAMA_BASE=(--device cuda --preset base --vocab 50257 --seq 1024 --dtype bf16 --warmup 2 --steps 4)

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2
    shift 2
    [[ $WANTED == *" $name "* ]] || return 0
    local left=$((BUDGET - (SECONDS - START)))
    if ((limit > left)); then
        echo "## $name: skipped (needs up to ${limit} s, ${left} s of the budget left)" | tee -a "$LOG"
        return 0
    fi
    echo "## $name: $* (limit ${limit} s)" | tee -a "$LOG"
    local t0=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG"
    echo "## $name: exit ${PIPESTATUS[0]} after $((SECONDS - t0)) s" | tee -a "$LOG"
}

{
    echo "## $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader 2>&1
    "$PYTHON" -c "import torch, transformers, lightning; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'transformers', transformers.__version__, 'lightning', lightning.__version__)" 2>&1
} | tee "$LOG"

step losstests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs -k fused
step syncs 90 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs -k never_waits
step kernels 120 "$PYTHON" benchmarks/kernels.py
step bench 120 "$PYTHON" benchmarks/throughput.py --family llama "${LLAMA_BASE[@]}"
step compile 200 "$PYTHON" benchmarks/throughput.py --family llama "${LLAMA_BASE[@]}" --compile both --rounds 3 --profile 20
fit_step() {  # a tokenizer, the corpus prepared with it, then the fit: the loop's cost, no tokenizing in it
    local dir data=()
    dir=$(mktemp -d)
    [[ -n ${FIT_CORPUS:-} ]] && data=(--data "$FIT_CORPUS")
    "$PYTHON" -m scratchlm tokenizer train "${data[@]}" --family llama --vocab-size 32768 --out "$dir/tok" &&
        "$PYTHON" -m scratchlm prepare "${data[@]}" --tokenizer "$dir/tok" --out "$dir/prepared" &&
        "$PYTHON" -m scratchlm fit --model.family llama --model.size base --data.paths "$dir/prepared" \
            --data.block_size 1024 --data.batch_size 16 --trainer.accelerator gpu --trainer.precision bf16-mixed \
            --trainer.max_steps 80 --trainer.log_every_n_steps 2 --trainer.val_check_interval 1000 \
            --trainer.enable_progress_bar false --trainer.default_root_dir "$dir/run" &&
        "$PYTHON" benchmarks/fit_speed.py "$dir/run" --skip 20 &&
        # The bare steps of the same model (the tokenizer's vocabulary), ours against HF: fit's
        # tokens/s over these is what the loop costs. (LLAMA_BASE, an array, does not reach
        # this function's shell.)
        "$PYTHON" benchmarks/throughput.py --family llama --device cuda --preset base --seq 1024 --dtype bf16 \
            --warmup 2 --steps 4 --rounds 2 --vocab "$("$PYTHON" -c "import sys, tokenizers;
print(tokenizers.Tokenizer.from_file(sys.argv[1] + '/tokenizer.json').get_vocab_size())" "$dir/tok")"
}
export -f fit_step
export PYTHON
step fit 180 bash -c fit_step
step eagerloss 90 "$PYTHON" benchmarks/throughput.py --family llama "${LLAMA_BASE[@]}" --loss-chunk eager
step tests 170 "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_cuda.py -rs -k "not never_waits and not fused"
step docs 90 "$PYTHON" benchmarks/throughput.py --family llama "${LLAMA_BASE[@]}" --docs 4
step families 90 "$PYTHON" benchmarks/throughput.py --family gpt2,bert --device cuda --preset base \
    --vocab 50257 --seq 1024 --dtype bf16 --rounds 3
echo "## done after $((SECONDS - START)) s" | tee -a "$LOG"
