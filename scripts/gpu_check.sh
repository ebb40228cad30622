#!/usr/bin/env bash
# One-command GPU check: the gpu-marked tests, each benchmark workload's stages profiled, a
# short 2-stage job with both ranks on one GPU (gloo, host staging), and the GPT-2-small config in
# bf16 on the GPUs there are; prints one markdown table.
#
#   scripts/gpu_check.sh [OUT_DIR]        # OUT_DIR, else $OUT, else gpu_check_out/
#   GPU_CHECK_DEVICE=cpu scripts/gpu_check.sh /tmp/gc   # rehearsal without a GPU (gpu tests skip)
#
# Every part runs under `timeout`, cut short so that all end within BUDGET_SEC (9 minutes); its
# stdout/stderr go to OUT_DIR, and a failed part does not stop the next. Exit status: 0 when
# every part passed.
# Only command-line entry points are called, never pipedni internals.
set -uo pipefail

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
OUT_DIR="${1:-${OUT:-gpu_check_out}}"
mkdir -p "$OUT_DIR" && OUT_DIR="$(cd "$OUT_DIR" && pwd)"
cd "$(dirname "$0")/.."
PARTS="$OUT_DIR/parts.tsv"  # name, exit code, seconds, note: read by scripts/gpu_check.py
: > "$PARTS"
: > "$OUT_DIR/commands.txt"
rm -rf "$OUT_DIR"/{train_run,gpt2_run} "$OUT_DIR"/{install,env,gpu_tests,profile_mlp,profile_lm,train,gpt2}.{out,log}  # an earlier run's
START=$SECONDS
BUDGET_SEC=540

# within SECONDS: SECONDS, or what is left of the budget if less (at least 1)
within() {
    local left=$((START + BUDGET_SEC - SECONDS))
    echo $(( $1 < left ? $1 : (left > 1 ? left : 1) ))
}

# run NAME SECONDS CMD...: CMD's stdout to NAME.out, stderr to NAME.log, one line in parts.tsv.
run() {
    local name=$1 limit began=$SECONDS rc
    limit=$(within "$2")
    shift 2
    if [ "$limit" -lt 5 ]; then
        printf '%s\t124\t0\tnot run: the %ss budget was spent\n' "$name" "$BUDGET_SEC" >> "$PARTS"
        NOTE=""
        return
    fi
    echo "== $name (at most ${limit}s): $*" | tee -a "$OUT_DIR/commands.txt"
    timeout --kill-after=5 "$limit" "$@" > "$OUT_DIR/$name.out" 2> "$OUT_DIR/$name.log"
    rc=$?
    [ $rc -eq 124 ] || [ $rc -eq 137 ] && NOTE="timed out after ${limit}s; $NOTE"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - began))" "$NOTE" >> "$PARTS"
    echo "   exit $rc, $((SECONDS - began))s"
    NOTE=""
}
NOTE=""

# 0. the package, and what machine this is
if ! python -c "import pipedni" 2>/dev/null; then
    NOTE="pipedni was not importable: installed it"
    run install 60 python -m pip install --no-deps --no-build-isolation -e .
fi
NOTE="device: $DEVICE"
run env 30 python scripts/gpu_check.py env "$DEVICE"
git rev-parse --short HEAD > "$OUT_DIR/commit.txt" 2>/dev/null

# 1. the CUDA paths: transport through gloo with host staging, pipelines matching one process
run gpu_tests 150 python -m pytest -m gpu -q -p no:cacheprovider \
    --continue-on-collection-errors tests

# 2. each stage timed alone: forward+backward, optimizer, predictor. Without its files (`info`
#    exits 2) the MLP runs on synthetic data; the LM has no synthetic stand-in and is skipped.
data_rc() { timeout "$(within 30)" python -m pipedni.data info "$1" > "$OUT_DIR/data_$1.log" 2>&1; echo $?; }
MLP_DATA=()
[ "$(data_rc fashion_mnist)" -eq 2 ] && MLP_DATA=(--data.name=synthetic)
NOTE="${MLP_DATA[*]:+no Fashion-MNIST: synthetic data}"
run profile_mlp 60 python -m pipedni.bench.profile configs/bench_mlp_fashion.yaml --stages 2 \
    --dist.device="$DEVICE" "${MLP_DATA[@]}"
if [ "$(data_rc kjv)" -ne 2 ]; then
    run profile_lm 60 python -m pipedni.bench.profile configs/bench_transformer_kjv.yaml --stages 2 \
        --dist.device="$DEVICE"
else
    printf 'profile_lm\tskip\t0\tno kjv data (python -m pipedni.data fetch kjv, or bring data/)\n' >> "$PARTS"
fi

# 3. a short job, both ranks on the one device (one GPU: gloo with host staging)
NOTE="${MLP_DATA[*]:+no Fashion-MNIST: synthetic data}"
run train 90 python -m pipedni.launch --nproc_per_node=2 configs/bench_mlp_fashion.yaml \
    --dist.device="$DEVICE" --train.steps=50 --train.microbatches=4 --run.log_every=10 \
    --run.timeline_steps=3 --run.dir="$OUT_DIR/train_run" "${MLP_DATA[@]}"   # timeline.png: what each stage did

# 4. GPU-sized work: the GPT-2-small config (bf16) for 30 steps. One GPU: 2 stages sharing it (gloo,
#    host staging); 2 or 3 GPUs: 2 stages over NCCL; 4 or more: its 4. The CPU rehearsal runs the
#    same command on a model cut down to seconds.
if [ "$(data_rc kjv)" -ne 2 ]; then
    GPUS=$(python -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
    NPROC=$([ "$GPUS" -ge 4 ] && echo 4 || echo 2)
    SMALL=()
    [ "$DEVICE" = cpu ] && SMALL=(--model.depth=2 --model.width=64 --model.heads=2 --data.seq_len=64
                                  --data.batch_size=8 --train.microbatches=2)
    NOTE="$NPROC stages on $GPUS GPU(s)${SMALL[*]:+; cut down for the CPU rehearsal}"
    run gpt2 150 python -m pipedni.launch --nproc_per_node="$NPROC" configs/gpt2_small_kjv.yaml \
        --dist.device="$DEVICE" --train.steps=30 --train.eval_every=0 --run.log_every=10 \
        --run.dir="$OUT_DIR/gpt2_run" "${SMALL[@]}"
else
    printf 'gpt2\tskip\t0\tno kjv data (python -m pipedni.data fetch kjv, or bring data/)\n' >> "$PARTS"
fi

# 5. the table (also in table.md)
echo "$((SECONDS - START))" > "$OUT_DIR/total_sec.txt"
python scripts/gpu_check.py table "$OUT_DIR" | tee "$OUT_DIR/table.md"
status=${PIPESTATUS[0]}
echo "log folder: $OUT_DIR"
exit "$status"
