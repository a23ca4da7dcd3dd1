"""Does AGD decide the same in bf16 as in fp32? Teacher-forced on fp32 AGD trajectories, rules prompts.

    python scripts/measure_bf16.py --n 100 --tokens 32 --batch-size 16 --threads 1
    # writes docs/precision/bf16-smollm2.{json,md}

fp32 AGD (k=5, min_prob=0.05, ROI = the system message, every step guided) writes a continuation of
each of the first ``--n`` rules conversations. Both precisions (fp32, and the same weights in bf16)
then read those continuations teacher-forced through the forward engine, in batches. At every step
each precision decides on its OWN view: its probabilities give its candidates (top-k, p >= min_prob);
with fewer than two it takes its greedy token, else the candidate with the best ROI score (ties: the
more probable). AGD_e decides the same way after an entropy gate (greedy below 1.734 nats, each
precision on its own entropy).

Reported, with 95% cluster-bootstrap CIs over conversations (steps of one conversation are correlated):
- AGD, steps where fp32 is guided (>= 2 candidates): same decision; same candidate set; both;
- AGD_e, steps where either precision's gate is open: the same three;
- the earlier script's figure, bf16's pick among fp32's candidates (it can overstate agreement: it
  hides candidate-set differences);
- why bf16 decides otherwise: another candidate set (logit precision) or the same set ranked otherwise
  (relevance precision), and how close fp32's top two scores were there;
- self-consistency: fp32 teacher-forced must reproduce the decisions of its own generation (~100%).
Every step is recorded in the JSON.
"""
from __future__ import annotations

import argparse
import json
import random
import shlex
import statistics
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import agdecode  # noqa: E402
from agdecode.decoding import entropy  # noqa: E402
from agdecode.methods import engine_row  # noqa: E402
from agdecode.engines.forward import ForwardEngine  # noqa: E402
from agdecode.checks import positive_int  # noqa: E402
from agdecode.eval.datasets import load_items  # noqa: E402
from agdecode.provenance import provenance  # noqa: E402
from agdecode.prompt import render_prompt  # noqa: E402
from agdecode.roi import resolve_region  # noqa: E402
from agdecode.sources import Row  # noqa: E402

ROI = "system"
BOOTSTRAP = 2000  # cluster-bootstrap resamples


def forced(model, rows: Sequence[Row], conts: Sequence[list[int]], k: int, batch_size: int,
           ref: Sequence[list[list[int]]] | None = None) -> list[list[dict]]:
    """Per row and step of ``conts``, teacher-forced in batches of ``batch_size``: the top-k ids and
    probabilities, their ROI scores, the entropy; with ``ref`` also the ROI scores of ``ref[row][step]``."""
    out: list[list[dict]] = [[] for _ in rows]
    for lo in range(0, len(rows), batch_size):
        idx = list(range(lo, min(lo + batch_size, len(rows))))
        with ForwardEngine(model, 1) as eng:
            logits = eng.prefill([rows[b] for b in idx])
            for t in range(max(len(conts[b]) for b in idx)):
                top_p, top_i = torch.softmax(logits.float(), -1).topk(k, -1)
                h = entropy(logits).tolist()
                scores = eng.scores(top_i, torch.arange(len(idx)))[:, 0].float()        # (B, k)
                for j, b in enumerate(idx):
                    if t >= len(conts[b]):
                        continue
                    v = {"ids": top_i[j].tolist(), "probs": _r(top_p[j]), "scores": _r(scores[j]), "entropy": _r(h[j])}
                    if ref is not None:
                        s = eng.scores(torch.tensor([ref[b][t]], dtype=torch.long), torch.tensor([j]))[0, 0].float()
                        v["scores_of_fp32_candidates"] = _r(s)
                    out[b].append(v)
                # Rows whose continuation ended repeat their last token; their steps are not recorded.
                logits = eng.step(torch.tensor([conts[b][min(t, len(conts[b]) - 1)] for b in idx]))
    return out


def _r(x) -> float | list[float]:
    """Floats rounded to 7 significant digits (fp32's precision) for the JSON."""
    x = x.tolist() if isinstance(x, torch.Tensor) else x
    return [float(f"{v:.7g}") for v in x] if isinstance(x, list) else float(f"{x:.7g}")


def candidates(v: dict, min_prob: float) -> list[int]:
    return [i for i, p in zip(v["ids"], v["probs"]) if p >= min_prob]


def decide(v: dict, min_prob: float, gate: float | None = None) -> tuple[list[int], int]:
    """(the options, the decision) of one precision at one step: with the gate closed or fewer than two
    candidates the only option is greedy; else the best ROI score among the candidates (ties: the more
    probable, as in decoding.AttributionChoice)."""
    cands = candidates(v, min_prob)
    if len(cands) < 2 or (gate is not None and v["entropy"] < gate):
        return [v["ids"][0]], v["ids"][0]
    return cands, cands[max(range(len(cands)), key=lambda j: (v["scores"][j], -j))]


def top_two_gap(scores: list[float]) -> float:
    """(best - second) / max(|best|, |second|): 0 = a tie, small = a close call (at most 2)."""
    s1, s2 = sorted(scores, reverse=True)[:2]
    return (s1 - s2) / max(abs(s1), abs(s2)) if max(abs(s1), abs(s2)) > 0 else 0.0


def step_record(item: str, t: int, token: int, v32: dict, v16: dict, min_prob: float, gate: float) -> dict:
    o32, d32 = decide(v32, min_prob)
    o16, d16 = decide(v16, min_prob)
    e32, de32 = decide(v32, min_prob, gate)
    e16, de16 = decide(v16, min_prob, gate)
    guided = len(o32) >= 2
    on_fp32 = None  # the earlier figure: bf16's ROI scores ranking fp32's candidates
    if guided:
        on_fp32 = o32[max(range(len(o32)), key=lambda j: (v16["scores_of_fp32_candidates"][j], -j))]
    differ, differ_e = d16 != d32, de16 != de32
    open32, open16 = v32["entropy"] >= gate, v16["entropy"] >= gate
    return {
        "item": item, "step": t, "token": token, "fp32": v32, "bf16": v16,
        "fp32_decision": d32, "bf16_decision": d16, "fp32_guided": guided,
        "same_decision": not differ, "same_set": set(o32) == set(o16),
        "bf16_pick_on_fp32_candidates": on_fp32,
        "fp32_top_two_gap": _r(top_two_gap(v32["scores"][: len(o32)])) if guided else None,
        "cause": None if not differ else "candidate-set" if set(o32) != set(o16) else "ranking",
        "fp32_gate_open": open32, "bf16_gate_open": open16,
        "fp32_decision_e": de32, "bf16_decision_e": de16,
        "same_decision_e": not differ_e, "same_set_e": set(e32) == set(e16),
        "cause_e": None if not differ_e else "gate" if open32 != open16
        else "candidate-set" if set(e32) != set(e16) else "ranking",
    }


def share(steps: list[dict], hit: Callable[[dict], bool], seed: int = 0) -> dict:
    """The share of ``steps`` where ``hit``, with a 95% cluster bootstrap over conversations."""
    per: dict[str, list[int]] = {}
    for s in steps:
        c = per.setdefault(s["item"], [0, 0])
        c[0] += bool(hit(s))
        c[1] += 1
    if not per:
        return {"share": None, "ci95": None, "wilson95": None, "hits": 0, "steps": 0, "conversations": 0}
    counts = list(per.values())
    hits, n = sum(c[0] for c in counts), sum(c[1] for c in counts)
    rng, boot = random.Random(seed), []
    for _ in range(BOOTSTRAP):
        draw = rng.choices(counts, k=len(counts))
        boot.append(sum(c[0] for c in draw) / sum(c[1] for c in draw))
    boot.sort()
    ci = [boot[int(0.025 * BOOTSTRAP)], boot[int(0.975 * BOOTSTRAP) - 1]]
    return {"share": hits / n, "ci95": ci, "wilson95": wilson(hits, n), "hits": hits, "steps": n,
            "conversations": len(counts)}


def wilson(hits: int, n: int, z: float = 1.96) -> list[float]:
    """The Wilson score interval; it treats steps as independent (they are not: see the cluster bootstrap)."""
    p, d = hits / n, 1 + z * z / n
    centre, half = (p + z * z / (2 * n)) / d, z * (p * (1 - p) / n + z * z / (4 * n * n)) ** 0.5 / d
    return [centre - half, centre + half]


def summarise(steps: list[dict], self_check: list[bool], self_check_guided: list[bool]) -> dict:
    guided = [s for s in steps if s["fp32_guided"]]
    gated = [s for s in steps if s["fp32_gate_open"] or s["bf16_gate_open"]]
    wrong = [s for s in guided if not s["same_decision"]]
    flips = [s for s in wrong if s["cause"] == "ranking"]
    wrong_e = [s for s in gated if not s["same_decision_e"]]
    return {
        "steps": len(steps), "fp32_guided_steps": len(guided), "gate_open_steps": len(gated),
        "agd": {"same_decision": share(guided, lambda s: s["same_decision"]),
                "same_set": share(guided, lambda s: s["same_set"]),
                "same_set_and_decision": share(guided, lambda s: s["same_set"] and s["same_decision"]),
                "old_same_pick_on_fp32_candidates":
                    share(guided, lambda s: s["bf16_pick_on_fp32_candidates"] == s["fp32_decision"]),
                "same_decision_every_step": share(steps, lambda s: s["same_decision"])},
        "agd_e": {"same_decision": share(gated, lambda s: s["same_decision_e"]),
                  "same_set": share(gated, lambda s: s["same_set_e"]),
                  "same_set_and_decision": share(gated, lambda s: s["same_set_e"] and s["same_decision_e"])},
        "disagreements": {
            "n": len(wrong), "candidate_set": len(wrong) - len(flips), "ranking": len(flips),
            "ranking_share": len(flips) / len(wrong) if wrong else None,
            "median_gap_ranking_flips": statistics.median(s["fp32_top_two_gap"] for s in flips) if flips else None,
            "median_gap_all_guided": statistics.median(s["fp32_top_two_gap"] for s in guided) if guided else None},
        "disagreements_e": {"n": len(wrong_e), **{c: sum(s["cause_e"] == c for s in wrong_e)
                                                  for c in ("gate", "candidate-set", "ranking")}},
        "self_consistency": {"every_step": sum(self_check) / len(self_check),
                             "fp32_guided_steps": sum(self_check_guided) / max(1, len(self_check_guided)),
                             "mismatches": len(self_check) - sum(self_check)},
    }


def environment(threads: int) -> dict:
    prov = provenance()
    return {"torch": prov["torch"], "transformers": prov["transformers"], "cpu": prov["cpu"], "threads": threads,
            "git_commit": prov["git"]["commit"], "git_dirty": prov["git"]["dirty"],
            "git_dirty_paths": prov["git"]["changed"]}


def _pct(x: dict) -> str:
    if x["share"] is None:
        return "n/a | n/a | 0"
    return f"{x['share']:.1%} | {x['ci95'][0]:.1%} – {x['ci95'][1]:.1%} | {x['hits']}/{x['steps']}"


def markdown(doc: dict) -> str:
    st, sm = doc["settings"], doc["summary"]
    agd, agde, sc = sm["agd"], sm["agd_e"], sm["self_consistency"]
    dis, de = sm["disagreements"], sm["disagreements_e"]
    wil = lambda x: "n/a" if x["share"] is None else f"{x['wilson95'][0]:.1%} – {x['wilson95'][1]:.1%}"  # noqa: E731
    gap = lambda x: "n/a" if x is None else f"{x:.3f}"  # noqa: E731
    rows = [
        ("**AGD: same decision** (main figure)", agd["same_decision"]),
        ("AGD: same candidate set", agd["same_set"]),
        ("AGD: same set and same decision", agd["same_set_and_decision"]),
        ("AGD: same decision, every step (fp32 guided or not)", agd["same_decision_every_step"]),
        (f"AGD_e (gate {st['entropy_threshold']} nats): same decision", agde["same_decision"]),
        ("AGD_e: same options (candidate set, or greedy where gated)", agde["same_set"]),
        ("AGD_e: same options and same decision", agde["same_set_and_decision"]),
        ("*Earlier figure*: bf16's pick among **fp32's** candidates", agd["old_same_pick_on_fp32_candidates"]),
    ]
    table = "\n".join(f"| {name} | {_pct(x)} |" for name, x in rows)
    env = doc["environment"]
    return f"""# AGD decisions in bf16 vs fp32 ({st['model']})

`{doc['command']}`

{st['n']} rules prompts, up to {st['tokens']} tokens each of fp32 AGD (k={st['k']}, min_prob={st['min_prob']},
ROI {st['roi']}, every step guided; {sm['steps']} steps), read teacher-forced by fp32 and by bf16 (batch
{st['batch_size']}). Each precision decides on its own probabilities (its own candidate set) and its own ROI
scores. AGD rows: the {sm['fp32_guided_steps']} steps where fp32 has at least two candidates. AGD_e rows: the
{sm['gate_open_steps']} steps where either precision's entropy is at or above {st['entropy_threshold']} nats.
95% CIs: cluster bootstrap over conversations ({BOOTSTRAP} resamples); for the main figure the Wilson
interval, which takes steps as independent, is {wil(agd['same_decision'])}.

| share | value | 95% CI | steps |
|---|---|---|---|
{table}

**Self-consistency** (fp32 teacher-forced reproduces fp32's generated token): {sc['every_step']:.1%} of all
steps, {sc['fp32_guided_steps']:.1%} of fp32-guided steps ({sc['mismatches']} mismatches).

## Where bf16 decides otherwise

Of the {dis['n']} AGD disagreements, {dis['candidate_set']} have another candidate set (the precision of the
logits / probabilities: a token crosses min_prob or the top-k edge) and {dis['ranking']} the same set ranked
otherwise (the precision of the ROI relevance). Median relative gap of fp32's top two scores,
(s1 - s2) / max(|s1|, |s2|): {gap(dis['median_gap_ranking_flips'])} at ranking flips,
{gap(dis['median_gap_all_guided'])} over all guided steps.

Of the {de['n']} AGD_e disagreements, {de['gate']} come from the gate (the two entropies on either side of
{st['entropy_threshold']} nats), {de['candidate-set']} from the candidate set and {de['ranking']} from the ranking.

## Reading

{reading(sm)}

torch {env['torch']}, transformers {env['transformers']}, {env['cpu']}, {env['threads']} thread(s), git
{env['git_commit'][:12]}{' (dirty)' if env['git_dirty'] else ''}.
"""


def reading(sm: dict) -> str:
    agd, dis = sm["agd"], sm["disagreements"]
    main, old, same_set = (agd[k]["share"] for k in ("same_decision", "old_same_pick_on_fp32_candidates", "same_set"))
    if main is None:
        return "No step had two fp32 candidates: nothing to compare."
    lo, hi = agd["same_decision"]["ci95"]
    text = (f"bf16 takes fp32's decision at {main:.1%} (95% CI {lo:.1%} – {hi:.1%}) of fp32's guided steps; the "
            f"candidate sets agree at {same_set:.1%}. The earlier figure, bf16 ranking fp32's candidates, gives "
            f"{old:.1%}: {format(100 * (old - main), '.1f') + ' points higher' if old > main else 'no higher'} than "
            f"bf16 deciding on its own candidates")
    if dis["n"]:
        text += (f". Of the {dis['n']} disagreements, {1 - dis['ranking_share']:.0%} come from the candidate set "
                 f"(logits) and {dis['ranking_share']:.0%} from the ranking (relevance)")
        g, g_all = dis["median_gap_ranking_flips"], dis["median_gap_all_guided"]
        if g is not None:
            text += (f"; the ranking flips have a median top-two gap of {g:.3f} against {g_all:.3f} over all guided "
                     f"steps{' (close calls)' if g < g_all else ''}")
    text += (". Teacher forcing compares single decisions on fp32's path; it says nothing directly about whole "
             "free-running outputs, where one different token changes everything after it.")
    return text


def dumps(doc: dict) -> str:
    """JSON, indented, with one line per step record."""
    head = json.dumps({k: v for k, v in doc.items() if k != "steps"}, indent=1, ensure_ascii=False)
    steps = ",\n  ".join(json.dumps(s) for s in doc["steps"])
    return head[:-2] + f',\n "steps": [\n  {steps}\n ]\n}}\n'


class Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, no usage block
        self.exit(2, f"{self.prog}: error: {message}\n")


def probability(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in [0, 1], got {s!r}")
    return v


def nonnegative(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = -1.0
    if not v >= 0.0:  # NaN too
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {s!r}")
    return v


def main() -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, default=100, help="rules conversations (default 100)")
    p.add_argument("--tokens", type=positive_int, default=32, help="fp32 AGD tokens per conversation (default 32)")
    p.add_argument("--batch-size", type=positive_int, default=16, help="sequences per batch (default 16)")
    p.add_argument("--k", type=positive_int, default=5)
    p.add_argument("--min-prob", type=probability, default=0.05)
    p.add_argument("--entropy-threshold", type=nonnegative, default=1.734, help="AGD_e gate in nats (default 1.734)")
    p.add_argument("--threads", type=positive_int, default=1)
    p.add_argument("--out", default="docs/precision/bf16-smollm2", help="output path without suffix")
    a = p.parse_args()
    items = load_items("rules", "rules").items
    if a.n > len(items):
        p.error(f"--n {a.n} is more than the {len(items)} rules conversations")
    items = items[: a.n]
    torch.set_num_threads(a.threads)

    m32, tok = agdecode.load_model("smollm2", dtype="float32")
    m16, _ = agdecode.load_model("smollm2", dtype="bfloat16")
    convs = [it["messages"] for it in items]
    refs = agdecode.generate(m32, tok, convs, batch_size=a.batch_size, max_new_tokens=a.tokens, k=a.k,
                             min_prob=a.min_prob, roi=ROI, entropy_threshold=None, engine="forward")
    rows = []
    for c in convs:
        prompt = render_prompt(tok, c)
        rows.append(engine_row(prompt.input_ids[0], [resolve_region(ROI, prompt, m32)]))
    conts = [r.token_ids for r in refs]
    s32 = forced(m32, rows, conts, a.k, a.batch_size)
    ref = [[candidates(v, a.min_prob) for v in x] for x in s32]
    s16 = forced(m16, rows, conts, a.k, a.batch_size, ref=ref)

    steps, self_check, self_check_guided = [], [], []
    for it, cont, x, y in zip(items, conts, s32, s16):
        for t, (v32, v16) in enumerate(zip(x, y)):
            rec = step_record(it["id"], t, cont[t], v32, v16, a.min_prob, a.entropy_threshold)
            steps.append(rec)
            self_check.append(rec["fp32_decision"] == cont[t])
            if rec["fp32_guided"]:
                self_check_guided.append(rec["fp32_decision"] == cont[t])
    doc = {
        "command": "python scripts/measure_bf16.py " + shlex.join(sys.argv[1:]),
        "settings": {"model": "smollm2 (SmolLM2-135M-Instruct)", "dtypes": ["float32", "bfloat16"],
                     "dataset": "rules", "n": a.n, "tokens": a.tokens, "k": a.k, "min_prob": a.min_prob,
                     "roi": ROI, "trajectory_entropy_threshold": None, "entropy_threshold": a.entropy_threshold,
                     "batch_size": a.batch_size, "bootstrap": BOOTSTRAP, "engine": "forward",
                     "trajectory_lengths": [len(c) for c in conts]},
        "environment": environment(a.threads),
        "summary": summarise(steps, self_check, self_check_guided),
        "steps": steps,
    }
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out + ".json").write_text(dumps(doc))
    md = markdown(doc)
    Path(a.out + ".md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
