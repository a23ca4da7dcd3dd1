#!/usr/bin/env bash
# The runs behind docs/results.md: greedy, CAD/DoLa, AGD and gated AGD (AttnLRP and Input x Gradient,
# the paper's tau = 1.734 and the calibrated tau) on the default model (SmolLM2-135M-Instruct).
#
#   scripts/run_results.sh                         # the full runs: 200 items per setting
#   LIMIT=10 MAX_RULES=48 MAX_QA=48 OUT=runs/pilot scripts/run_results.sh   # the pilot
#
# Every command is resumable (run the script again after a crash or Ctrl-C) and appends to
# $OUT/<setting>/<method>/records.jsonl; the report goes to $OUT/report.md with one PNG per setting.
# Add RAY="--ray" (or RAY="--ray-address auto") to shard over Ray actors.
set -euo pipefail
cd "$(dirname "$0")/.."
AGD=${AGD:-.venv/bin/agd}
OUT=${OUT:-runs/results}
LIMIT=${LIMIT:-200}
MAX_RULES=${MAX_RULES:-64}    # what docs/results.md ran (rules asking for more words fail for every method alike)
MAX_QA=${MAX_QA:-32}          # short answers; recall is over the whole response
THREADS=${THREADS:-1}         # one torch thread per process is fastest on a shared CPU
RAY=${RAY:-}
COMMON=(--limit "$LIMIT" --threads "$THREADS" --seed 0 $RAY)

# The *-auto methods need the model's calibrated gate (in the user cache; ~30 min on 2 CPU cores).
# SKIP_CALIBRATE=1 reuses an existing calibration.
[[ -n "${SKIP_CALIBRATE:-}" ]] || $AGD calibrate --model smollm2 --threads "$THREADS" --max-new-tokens 128 \
    --plot docs/entropy-smollm2.png --no-progress

# The grid of docs/results.md: every AGD variant on rules; on QA the paper's tau = 1.734 gate only where
# time allowed (open-book, AttnLRP).
GATED=agd,agd-gated,agd-gated-auto,agd-ixg,agd-ixg-gated,agd-ixg-gated-auto
OPEN=agd,agd-gated,agd-gated-auto,agd-ixg,agd-ixg-gated-auto
CLOSED=agd,agd-gated-auto,agd-ixg,agd-ixg-gated-auto
# HEADS=1 adds the head ROIs of the paper (needs head sets shipped for the model, `agd heads discover`).
CLOSED_HEADS=${HEADS:+,agd@heads:parametric,agd-gated-auto@heads:parametric}
OPEN_HEADS=${HEADS:+,agd@heads:in-context,agd-gated-auto@heads:in-context}

# Rule following, rules in the system message (ROI: the system message); the reference setting
# has the rules in the user message (no system message, so greedy only).
$AGD eval rules --data rules --method greedy,cad,$GATED --max-new-tokens "$MAX_RULES" --out "$OUT/rules" "${COMMON[@]}"
$AGD eval rules --data rules-reference --method greedy --max-new-tokens "$MAX_RULES" --out "$OUT/rules-reference" "${COMMON[@]}"

# Closed-book QA (ROI: the question; DoLa is the factuality baseline).
$AGD eval qa --data triviaqa --method greedy,dola,$CLOSED$CLOSED_HEADS --max-new-tokens "$MAX_QA" --out "$OUT/triviaqa" "${COMMON[@]}"
$AGD eval qa --data nq --method greedy,dola,$CLOSED$CLOSED_HEADS --max-new-tokens "$MAX_QA" --out "$OUT/nq" "${COMMON[@]}"

# Open-book NQ: gold passage among 4 distractors (ROI: all documents; CAD contrasts with/without them).
$AGD eval qa --data nq-open-book --method greedy,cad,$OPEN$OPEN_HEADS --max-new-tokens "$MAX_QA" --out "$OUT/nq-open-book" "${COMMON[@]}"

$AGD eval report "$OUT" --out "$OUT"
