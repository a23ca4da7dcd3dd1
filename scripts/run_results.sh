#!/usr/bin/env bash
# The runs behind docs/results.md, on the default model (SmolLM2-135M-Instruct), committed as records.
#
#   scripts/run_results.sh                 # the full grid: every method, 200 items per setting
#   GRID=small scripts/run_results.sh      # greedy and AGD, 20 items, rules and open-book NQ (a check)
#   GRID=bf16 scripts/run_results.sh       # the bf16 tables of docs/results.md: rules (AGD, AGD_e, I x G),
#                                          # closed-book TriviaQA/NQ, open-book and 10-document NQ
#
# Every eval command is resumable (run the script again after a crash or Ctrl-C) and appends to
# $OUT/<setting>/<method>/records.jsonl (+ timings.jsonl). At the end the runs are archived,
# compressed and deterministic, into docs/results/<task>-<data>/<method>/ (commit that folder), and
# the marked tables of docs/results.md are regenerated from the archive:
#   agd eval archive $OUT --to docs/results
#   agd eval report --update-doc docs/results.md docs/results
# A table appears in docs/results.md only where the document has its markers
# (<!-- table:qa-triviaqa --> ... <!-- /table:qa-triviaqa -->); `agd eval report --markdown-tables
# docs/results` prints every table with its markers, to paste in.
# Add RAY="--ray" (or RAY="--ray-address auto") to shard over Ray actors.
set -euo pipefail
cd "$(dirname "$0")/.."
AGD=${AGD:-.venv/bin/agd}
GRID=${GRID:-full}
OUT=${OUT:-runs/results$([[ $GRID == bf16 ]] && echo -bf16)}
DOCS=${DOCS:-docs/results$([[ $GRID == bf16 ]] && echo /bf16)}
THREADS=${THREADS:-1}         # one torch thread per process is fastest on a shared CPU
RAY=${RAY:-}

# The *-auto methods use the model's calibrated gate: the one shipped with the package (made on
# rules-calibration, disjoint from the evaluated items), or the user's own. CALIBRATE=1 remakes it.
if [[ -n "${CALIBRATE:-}" ]]; then
    $AGD calibrate --model smollm2 --limit 100 --max-new-tokens 64 --threads "$THREADS" --plot docs/entropy-smollm2.png \
        --out src/agdecode/data/calibration/llama-f7e99dbef09ae7da.json --no-progress
fi

if [[ "$GRID" == small ]]; then
    LIMIT=${LIMIT:-20}
    COMMON=(--limit "$LIMIT" --threads "$THREADS" --seed 0 --no-progress $RAY)
    $AGD eval rules --data rules --method greedy,agd --max-new-tokens 64 --out "$OUT/rules" "${COMMON[@]}"
    $AGD eval qa --data nq-open-book --method greedy,agd --max-new-tokens 32 --out "$OUT/nq-open-book" "${COMMON[@]}"
elif [[ "$GRID" == bf16 ]]; then
    # The paper's grid in the deployed regime (bf16), 200 items a cell. PARTS picks sections
    # (default all); two shells with different PARTS share the work on two cores:
    #   PARTS="rules closed open" scripts/run_results.sh &  PARTS="multidoc" scripts/run_results.sh
    # Wall time on this machine (2 cores, one process each): see docs/results.md.
    LIMIT=${LIMIT:-200}
    DTYPE=${DTYPE:-bfloat16}
    PARTS=${PARTS:-rules closed open multidoc}
    COMMON=(--limit "$LIMIT" --threads "$THREADS" --seed 0 --no-progress --dtype "$DTYPE" $RAY)
    for part in $PARTS; do case $part in
    # Rule following (ROI: the system message): AGD vs AGD_e (tau 1.734) and the I x G ablation.
    rules) $AGD eval rules --data rules --method greedy,agd,agd-gated,agd-ixg --max-new-tokens 64 \
               --out "$OUT/rules" "${COMMON[@]}" ;;
    # Closed-book QA: DoLa against AGD with the parametric-knowledge heads as ROI (found by
    # `agd heads discover` on NQ lines 2000-2654, disjoint from every evaluated item).
    closed) for set in triviaqa nq; do
               $AGD eval qa --data "$set" --method "greedy,dola,agd@heads:parametric,agd-gated@heads:parametric" \
                   --max-new-tokens 32 --out "$OUT/$set" "${COMMON[@]}"
           done ;;
    # Open-book NQ (gold passage among 4 distractors): CAD against AGD with the context ROI (all
    # documents) and with the in-context heads.
    open) $AGD eval qa --data nq-open-book --method "greedy,cad,agd,agd@heads:in-context" --max-new-tokens 32 \
              --out "$OUT/nq-open-book" "${COMMON[@]}" ;;
    # Ten documents (gold among 9 distractors).
    multidoc) $AGD eval qa --data nq-multi-doc --method "greedy,cad,agd" --max-new-tokens 32 \
                  --out "$OUT/nq-multi-doc" "${COMMON[@]}" ;;
    *) echo "unknown part $part (rules, closed, open, multidoc)" >&2; exit 2 ;;
    esac; done
    [[ -n "${NO_ARCHIVE:-}" ]] && exit 0
else
    LIMIT=${LIMIT:-200}
    MAX_RULES=${MAX_RULES:-64}    # rules asking for more words fail for every method alike
    MAX_QA=${MAX_QA:-32}          # short answers; recall is over the whole response
    COMMON=(--limit "$LIMIT" --threads "$THREADS" --seed 0 --no-progress $RAY)
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
    # Rules over a conversation: a user turn contradicting them, an earlier exchange, both; the
    # contrast ROI "system - user" beside the system ROI.
    for set in rules-conflict rules-multiturn rules-conflict-multiturn; do
        $AGD eval rules --data "$set" --method "greedy,cad,agd,agd-gated,agd@system - user" --max-new-tokens "$MAX_RULES" \
            --out "$OUT/$set" "${COMMON[@]}"
    done
    # Closed-book QA (ROI: the question; DoLa is the factuality baseline).
    $AGD eval qa --data triviaqa --method greedy,dola,$CLOSED$CLOSED_HEADS --max-new-tokens "$MAX_QA" --out "$OUT/triviaqa" "${COMMON[@]}"
    $AGD eval qa --data nq --method greedy,dola,$CLOSED$CLOSED_HEADS --max-new-tokens "$MAX_QA" --out "$OUT/nq" "${COMMON[@]}"
    # Open-book NQ: gold passage among 4 distractors (ROI: all documents; CAD contrasts with/without them).
    $AGD eval qa --data nq-open-book --method greedy,cad,$OPEN$OPEN_HEADS --max-new-tokens "$MAX_QA" --out "$OUT/nq-open-book" "${COMMON[@]}"
fi

$AGD eval archive "$OUT" --to "$DOCS"
$AGD eval report "$DOCS" --out "$DOCS"                     # report.md and one PNG per table
$AGD eval report --update-doc docs/results.md "$DOCS"      # the marked tables of docs/results.md
