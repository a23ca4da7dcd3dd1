#!/usr/bin/env bash
# The speed figures of the README ("Measured: agd bench"), in fp32 and bf16, one and two threads.
# Run on a quiet machine (nothing else on the cores): every command interleaves its modes, but
# another job still adds noise. Each writes JSON (every timed run, the machine, the commit) and a
# markdown table under docs/bench/quiet/.
#
#   scripts/run_bench.sh            # everything (about an hour on a 2-core CPU)
#   PARTS="throughput" scripts/run_bench.sh
set -euo pipefail
cd "$(dirname "$0")/.."
AGD=${AGD:-.venv/bin/agd}
OUT=${OUT:-docs/bench/quiet}
PARTS=${PARTS:-"throughput latency prefill rules threads"}
MODES=(greedy greedy-loop agd_e-forward agd-forward)

for part in $PARTS; do
    case $part in
    throughput)  # batch 1 and 16, 256-512-token prompts, 32 new tokens
        for dt in bfloat16 float32; do
            $AGD bench --throughput --threads 1 --rounds 2 --prefill-rounds 2 --batch-sizes 1 16 \
                --prompt-range 256 512 --new-tokens 32 --dtype $dt --modes "${MODES[@]}" --out "$OUT"
        done ;;
    latency)  # batch 1, a 1098-token prompt, 48 new tokens, prefill included
        for dt in bfloat16 float32; do
            $AGD bench --threads 1 --rounds 3 --lengths 1098 --new-tokens 48 --no-memory --dtype $dt \
                --modes "${MODES[@]}" --out "$OUT/latency-1098"
        done ;;
    prefill)  # a 4096-token prompt: the prefill with tangents against a plain one
        for dt in bfloat16 float32; do
            $AGD bench --threads 1 --rounds 2 --lengths 4096 --new-tokens 8 --no-memory --dtype $dt \
                --modes greedy greedy-loop agd-forward --out "$OUT/prefill-4096"
        done ;;
    rules)  # real prompts (the rules dev conversations), where AGD_e's gate opens
        $AGD bench --throughput --prompts rules --threads 1 --rounds 2 --prefill-rounds 2 --batch-sizes 16 \
            --new-tokens 64 --dtype bfloat16 --modes "${MODES[@]}" --out "$OUT" ;;
    threads)  # the batch-16 throughput with two threads per process
        for dt in bfloat16 float32; do
            $AGD bench --throughput --threads 2 --rounds 2 --prefill-rounds 2 --batch-sizes 16 \
                --prompt-range 256 512 --new-tokens 32 --dtype $dt --modes "${MODES[@]}" --out "$OUT/threads-2"
        done ;;
    *) echo "unknown part: $part" >&2; exit 2 ;;
    esac
done
