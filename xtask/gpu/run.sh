#!/usr/bin/env bash
# The GPU checks of issues #5, #6, #7 and #9 in one run, on a lent machine with a GPU but no Rust
# and no network. `cargo xtask gpu-kit` puts this script and kit.tar.xz (binaries built for the
# backend, SmolLM2's config and tokenizer, C4 text) in .device/; the device tool carries that
# folder (carry: [".device"]) and runs, from the repository root:
#
#   .device/run.sh [pair] [fig4] [decode] [calibrate] [serve]     (all five by default)
#
# pair: a random SmolLM2-sized base and fine-tune (`xtask random-pair`; the real pair is too big
# to carry) and its delta; fig4: BitDelta's Fig. 4 sweep on the device (#7); decode: generate
# with the merged model vs the packed delta, 3 runs each (#5); calibrate: `compress --calibrate
# full` on the device, the defaults (#6); serve: 8 deltas decoded together vs 8 merged models
# one after another (#9). Knobs: FIG4_SIZES (e.g. 4096), TOKENS (decode length, 128),
# CALIBRATE_ARGS (extra compress flags), SERVE_TOKENS (64). Results go to $OUT (log.txt, one
# file per check); each check has its own time limit and a failing one does not stop the rest.
# Rough times on an H100-class GPU (not yet measured): pair 20 s, fig4 3 min, decode 1 min,
# calibrate 1–2 min, serve 2 min.
set -uo pipefail
cd "$(dirname "$0")"
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
W=${WORK:-/tmp/bitdelta-gpu}
mkdir -p "$W"
# Progress lines go to log.txt and to the caller's stderr (fd 3), whatever a check redirects.
exec 3>&2
log() { echo "[$(date +%T)] $*" | tee -a "$OUT/log.txt" >&3; }
if [ ! -x "$W/kit/bitdelta" ] || [ kit.tar.xz -nt "$W/kit/bitdelta" ]; then
  rm -rf "$W/kit" && tar -xJf kit.tar.xz -C "$W" || { log "unpacking kit.tar.xz failed"; exit 1; }
fi
K=$W/kit
B=$K/bitdelta
DEVICE=$(cat "$K/backend")
PAIR=$W/pair
DELTA=$W/d.bitdelta.safetensors
steps=${*:-pair fig4 decode calibrate serve}
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.csv" 2>&1
nproc > "$OUT/cpus.txt"
# `check NAME LIMIT_S COMMAND...`: runs one check under a time limit, logging its wall time and status.
check() {
  local name=$1 limit=$2
  shift 2
  log "$name: start"
  local t0=$SECONDS
  timeout "$limit" "$@"
  log "$name: exit $? after $((SECONDS - t0)) s"
}
for s in $steps; do
  case $s in
    pair)
      check pair 300 "$K/xtask" random-pair "$K/smollm2" "$PAIR" 2>> "$OUT/log.txt"
      check delta 300 "$B" compress --base "$PAIR/base" --finetuned "$PAIR/finetuned" -o "$DELTA" --calibrate none --force --json > "$OUT/compress_none.json" 2>> "$OUT/log.txt" ;;
    fig4)
      check fig4 400 "$K/fig4_gpu" --bench > "$OUT/fig4.txt" 2>&1 ;;
    decode)
      for use in merge fused; do
        for run in 1 2 3; do
          check "decode $use $run" 300 "$B" generate --model "$PAIR/base" --delta "$DELTA" --delta-use "$use" --prompt "Once upon a time" \
            --max-new-tokens "${TOKENS:-128}" --ignore-eos --device "$DEVICE" --json > "$OUT/generate_${use}_$run.json" 2>> "$OUT/log.txt"
        done
      done ;;
    calibrate)
      # shellcheck disable=SC2086
      check calibrate 500 "$B" compress --base "$PAIR/base" --finetuned "$PAIR/finetuned" -o "$W/full.bitdelta.safetensors" \
        --calib-text "$K/text/c4.utf8" --device "$DEVICE" --force --json ${CALIBRATE_ARGS:-} > "$OUT/compress_full.json" 2> "$OUT/compress_full.stderr" ;;
    serve)
      check serve 500 "$K/xtask" bench serve --bin "$B" --pair "$PAIR" --device "$DEVICE" --tokens "${SERVE_TOKENS:-64}" --out "$OUT/serve.json" > "$OUT/serve.txt" 2>&1 ;;
    *) log "unknown check $s (pair, fig4, decode, calibrate, serve)" ;;
  esac
done
log "done"
