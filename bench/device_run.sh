#!/usr/bin/env bash
# The GPU figures of BENCHMARKS.md in one short run on a lent GPU machine:
#
#   OUT=/some/folder bash bench/device_run.sh        # on the GPU machine
#   OUT=/tmp/dry bash bench/device_run.sh --dry      # the same steps, tiny, on a CPU
#
# WAIT_S: seconds the runs wait for each other to compile (default 330); CHECKS: a
# comma-separated subset of bench/gpu_checks.py's checks (default all).
#
# 1. bench/gpu_checks.py: the CUDA-only fast paths agree with the plain ones.
# 2. bench/train_throughput.py in several configurations started side by side: they
#    compile in parallel (compilation is minutes, the timed steps seconds), then time
#    one at a time under a lock (see --barrier), so no timed step shares the machine.
#    "main" is the one that counts: baseline, eager and orchard's defaults in one
#    process; the others try alternatives not yet measured (BENCHMARKS.md): each
#    BatchNorm folded into the next layer (alone and at batch 512), each conv's bias
#    added apart (alone and at batch 512), and inductor's max-autotune (Triton conv
#    templates beside cuDNN).
# 3. bench/preprocess.py --nvjpeg cuda, once the GPU is free: the GPU workers' decoder
#    ([preprocessing] decoder = "nvjpeg") beside the CPU paths, per core and wall clock,
#    on two of its image sets at 1.3 MP (PREPROCESS=0 skips it).
# Everything lands in $OUT/device_run.tar.gz: one JSON and one log per run, kernel
# profiles, versions.
set -u
final=${OUT:?set OUT to a folder for the results}
mkdir -p "$final" || exit 1 # before minutes of runs, not after
out=$(mktemp -d) # everything, packed into $OUT/device_run.tar.gz at the end
barrier=$(mktemp -d)
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
export TORCHINDUCTOR_COMPILE_THREADS=${TORCHINDUCTOR_COMPILE_THREADS:-4}
size=(--full --device cuda --steps 48)
wait_s=${WAIT_S:-330}
sets=photo-mosaic,synthetic # photo-mosaic cuts scikit-image's sample photos
"$py" -c 'import skimage' 2>/dev/null || sets=synthetic,synthetic-soft
preprocess=(--nvjpeg cuda --n 64 --repeat 5 --sizes 1280x1024 --sets "$sets")
if [[ ${1:-} == --dry ]]; then
    size=(--device cpu --steps 2 --warmup 1 --images 64)
    wait_s=120
    preprocess=(--nvjpeg cpu --tiny --sizes 1280x1024 --sets "$sets")
fi

{
    date -u
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv 2>&1 || true
    "$py" -c 'import torch, sys; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())'
    nproc
    grep -m1 "model name" /proc/cpuinfo || true
} >"$out/machine.txt" 2>&1

runs=(main fold fold512 apart apart512 autotune)
parties=$((${#runs[@]} + 1)) # + the checks
common=(--barrier "$barrier" --parties "$parties" --barrier-timeout "$wait_s")

start() { # name, extra args...: one throughput run in the background
    local name=$1
    shift
    timeout $((wait_s + 120)) "$py" bench/train_throughput.py "${size[@]}" "${common[@]}" \
        --label "$name" --json "$out/tt_$name.json" "$@" >"$out/tt_$name.log" 2>&1 &
}

# the checks run first and count as a party, so nothing is timed while they use the GPU
(
    if [[ ${1:-} == --dry ]]; then
        echo "dry run: no CUDA checks" >"$out/gpu_checks.log"
    else
        timeout "$wait_s" "$py" bench/gpu_checks.py --json "$out/gpu_checks.json" \
            ${CHECKS:+--only "$CHECKS"} >"$out/gpu_checks.log" 2>&1
    fi
    touch "$barrier/ready-checks"
) &

start main --profile "$out/profile_main.txt"
start fold --skip-baseline --fold-norm --profile "$out/profile_fold.txt"
start fold512 --skip-baseline --fold-norm --batch-size 512
start apart --skip-baseline --bias-apart --profile "$out/profile_apart.txt"
start apart512 --skip-baseline --bias-apart --batch-size 512
start autotune --skip-baseline --inductor max_autotune=True --profile "$out/profile_autotune.txt"
wait

if [[ ${PREPROCESS:-1} != 0 ]]; then
    timeout 150 "$py" bench/preprocess.py "${preprocess[@]}" --out "$out/preprocess.json" \
        >"$out/preprocess.log" 2>&1
    tail -n 6 "$out/preprocess.log"
fi

"$py" - "$out" <<'EOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
for path in sorted(out.glob("tt_*.json")):
    r = json.loads(path.read_text())
    extra = f"  baseline {r['baseline_img_s']:,.0f}  ratio {r['ratio']:.2f}x" if "ratio" in r else ""
    print(f"{r['label']:>8}: {r['orchard_img_s']:>9,.0f} img/s{extra}")
EOF
if ! tar -czf "$final/device_run.tar.gz" -C "$out" .; then
  echo "could not pack the results; they are left in $out" >&2
  exit 1
fi
rm -rf "$barrier" "$out"
