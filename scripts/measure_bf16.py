"""How often does AGD pick the same candidate in bf16 as in fp32? Teacher-forced, on rules dev prompts.

    python scripts/measure_bf16.py --n 50 --tokens 32      # writes docs/precision/bf16-smollm2.{json,md}

For each prompt, fp32 AGD (k=5, min_prob=0.05, every step guided, ROI = the system message) writes
the reference continuation. Both models (fp32 and the same weights in bf16) then read that
continuation teacher-forced, batched, through the forward engine: at every step where fp32 has at
least two candidates, fp32's choice (the best ROI score) is compared with bf16's choice among the
same candidates, and bf16's own candidate set with fp32's. Every step is recorded in the JSON.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import agdecode  # noqa: E402
from agdecode.decoding import _engine_row  # noqa: E402
from agdecode.engines.forward import ForwardEngine  # noqa: E402
from agdecode.eval.datasets import load_items  # noqa: E402
from agdecode.roi import render_prompt, resolve_region  # noqa: E402


def forced(model, rows, continuations, k, min_prob):
    """Per row and step: (candidate ids, probabilities, ROI scores of the candidates), teacher-forced."""
    out = [[] for _ in rows]
    n = max(len(c) for c in continuations)
    with ForwardEngine(model, 1) as eng:
        logits = eng.prefill(rows)
        for t in range(n):
            probs = torch.softmax(logits.float(), -1)
            top_p, top_i = probs.topk(k, -1)
            scores = eng.scores(top_i, torch.arange(len(rows)))[:, 0].float()     # (B, k)
            for b in range(len(rows)):
                if t < len(continuations[b]):
                    out[b].append((top_i[b].tolist(), top_p[b].tolist(), scores[b].tolist()))
            nxt = torch.tensor([c[t] if t < len(c) else c[-1] for c in continuations])
            logits = eng.step(nxt)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=50)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--min-prob", type=float, default=0.05)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="docs/precision/bf16-smollm2")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    items = load_items("rules", "rules").items[: a.n]
    m32, tok = agdecode.load_model("smollm2")
    m16, _ = agdecode.load_model("smollm2", dtype="bfloat16")
    convs = [it["messages"] for it in items]
    refs = agdecode.generate(m32, tok, convs, k=a.k, min_prob=a.min_prob, max_new_tokens=a.tokens,
                             min_new_tokens=a.tokens)
    rows = []
    for c in convs:
        prompt = render_prompt(tok, c)
        rows.append(_engine_row(prompt.input_ids[0], [resolve_region("system", prompt, m32)]))
    conts = [r.token_ids for r in refs]
    s32 = forced(m32, rows, conts, a.k, a.min_prob)
    s16 = forced(m16, rows, conts, a.k, a.min_prob)
    steps = []
    for i, (x, y) in enumerate(zip(s32, s16)):
        for t, ((c32, p32, r32), (c16, p16, r16)) in enumerate(zip(x, y)):
            n = sum(q >= a.min_prob for q in p32)
            if n < 2:
                continue
            cands = c32[:n]
            pick32 = cands[max(range(n), key=lambda j: (r32[j], -j))]
            # bf16's scores for fp32's candidates (they are among its top-k when the sets agree)
            s16 = {c: r for c, r in zip(c16, r16)}
            common = [c for c in cands if c in s16]
            pick16 = max(common, key=lambda c: (s16[c], -cands.index(c))) if common else None
            n16 = sum(q >= a.min_prob for q in p16)
            steps.append({"item": items[i]["id"], "step": t, "candidates": cands, "fp32_scores": r32[:n],
                          "bf16_scores": [s16.get(c) for c in cands], "fp32_pick": pick32, "bf16_pick": pick16,
                          "same_pick": pick16 == pick32, "same_candidate_set": c16[:n16] == cands})
    same = sum(s["same_pick"] for s in steps) / len(steps)
    same_set = sum(s["same_candidate_set"] for s in steps) / len(steps)
    summary = {"items": len(items), "tokens_per_item": a.tokens, "guided_steps": len(steps),
               "same_pick": same, "same_candidate_set": same_set,
               "command": "python scripts/measure_bf16.py " + " ".join(sys.argv[1:])}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"summary": summary, "steps": steps}, indent=1))
    md = (f"# AGD decisions in bf16 vs fp32 (SmolLM2-135M-Instruct)\n\n`{summary['command']}`\n\n"
          f"{len(items)} rules dev prompts, {a.tokens} tokens each of fp32 AGD (k={a.k}, min_prob={a.min_prob}, "
          f"ROI system), read teacher-forced by both models: **{same:.1%}** of the {len(steps)} guided steps pick "
          f"the same candidate in bf16 as in fp32; the candidate sets agree on {same_set:.1%}.\n")
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
