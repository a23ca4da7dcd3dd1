"""Finding parametric-knowledge and in-context-retrieval heads (``agd heads discover``).

The procedure of the "Atlas of In-Context Learning" (Achtibat et al.), which AGD's head ROIs
follow (../docs and algorithm notes, section 2.2). For each head h:

    D(h) = mean over open-book items with a counterfactual passage of R+_h(counterfactual answer)
         - mean over closed-book items of R+_h(gold answer)

where R+_h(y) is the positive part of the AttnLRP relevance of the first answer token's logit at
the head's output (input of ``o_proj``), summed over the head dimension and over all positions.
Large positive D: the head carries what the context says (in-context heads); large negative D: it
carries what the model knows (parametric heads). The counterfactual passage replaces the gold
answer in the NQ gold passage by the answer of another question, so only reading the passage can
produce it.

Data: Natural Questions with gold passages (Liu et al. 2023), lines 2000-2654 of
``nq-open-oracle.jsonl.gz`` shipped as ``data/nq_oracle_discovery.jsonl.gz``; the evaluation uses
lines 0-1999 only, so heads are never found on evaluation items.
"""
from __future__ import annotations

import gzip
import json
import random
from importlib import resources
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from .architectures import get_spec
from .engines.reverse import attribute_batch
from .errors import AgdError
from .checks import check_writable, positive_int
from .heads import KINDS
from .identity import model_identity, model_key
from .models import DTYPE_HELP, dtype_name, load_model
from .prompt import render_prompt
from .report.style import new_figure

__all__ = ["discovery_items", "discover_heads", "plot_heads"]

SYSTEM = "Answer the question with a short answer."
SYSTEM_OPEN = "Answer the question with a short answer, using the document."
SPLIT = "nq-open-oracle.jsonl.gz lines 2000-2654 (evaluation uses lines 0-1999)"


def discovery_items(n: int | None = None, seed: int = 0) -> list[dict]:
    """NQ items with a gold passage and a counterfactual version of it.

    Example:
        >>> discovery_items(2)[0].keys()
        dict_keys(['id', 'question', 'answer', 'title', 'text', 'cf_answer', 'cf_text'])
    """
    path = resources.files("agdecode") / "data" / "nq_oracle_discovery.jsonl.gz"
    with gzip.open(path, "rt", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f if line.strip()]
    items = []
    for r in rows:
        answer = next((a for a in r["answers"] if a in r["text"]), None)
        if answer:
            items.append(dict(id=r["id"], question=r["question"], answer=answer, title=r["title"], text=r["text"]))
    rng = random.Random(seed)
    donors = items[:]
    rng.shuffle(donors)
    for item, donor in zip(items, donors + donors):
        cf = donor["answer"] if donor["answer"].lower() != item["answer"].lower() else "Zanzibar"
        item["cf_answer"], item["cf_text"] = cf, item["text"].replace(item["answer"], cf)
    return items if n is None else items[:n]


def _prompt_and_target(tokenizer, question: str, target: str, document: dict | None) -> tuple[torch.Tensor, int]:
    messages = [{"role": "system", "content": SYSTEM_OPEN if document else SYSTEM},
                {"role": "user", "content": question[:1].upper() + question[1:] + "?"}]
    prompt = render_prompt(tokenizer, messages, documents=[document] if document else None)
    return prompt.input_ids[0], tokenizer(target, add_special_tokens=False).input_ids[0]


def _head_relevance(model, tokenizer, cases: list[tuple[str, str, dict | None]]) -> torch.Tensor:
    """R+ per head ``(n, L, H)`` of each (question, target, document or None), in one batch."""
    prompts = [_prompt_and_target(tokenizer, *c) for c in cases]
    _, heads = attribute_batch(model, [p for p, _ in prompts], torch.tensor([t for _, t in prompts]), "lrp",
                               positive=True)
    return heads.cpu()


def _top(scores: torch.Tensor, n: int) -> list[list[int]]:
    idx = scores.flatten().topk(n).indices
    return [[int(i) // scores.shape[1], int(i) % scores.shape[1]] for i in idx]


def discover_heads(model: nn.Module, tokenizer, n_items: int = 200, top: int = 10, seed: int = 0,
                   kind: str = "parametric", batch_size: int = 8) -> dict:
    """Score every head by D (see module docstring) and pick the top ``top`` of each kind.

    Also reports stability: the overlap of the top heads found on two disjoint halves of the items.

    Example:
        >>> result = discover_heads(model, tok, n_items=100)
        >>> result["top"]["in-context"][:3]
    """
    if kind not in KINDS:
        raise AgdError(f"kind must be one of {KINDS}, got {kind!r}")
    if isinstance(n_items, bool) or not isinstance(n_items, int) or n_items < 2:
        raise AgdError(f"head discovery needs n_items >= 2 (one half for each stability check), got {n_items!r}")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise AgdError(f"top must be a positive number of heads, got {top!r}")
    n_layers, n_heads = get_spec(model).head_shape(model)
    if top > n_layers * n_heads:
        raise AgdError(f"top={top} is more heads than the model has ({n_layers} layers x {n_heads} heads)")
    items = discovery_items(n_items, seed)
    ob, cb = [], []
    with tqdm(total=len(items), desc="head discovery", unit="item") as bar:
        for start in range(0, len(items), batch_size):
            part = items[start:start + batch_size]
            ob.append(_head_relevance(model, tokenizer, [(it["question"], it["cf_answer"],
                                                          {"title": it["title"], "text": it["cf_text"]}) for it in part]))
            cb.append(_head_relevance(model, tokenizer, [(it["question"], it["answer"], None) for it in part]))
            bar.update(len(part))
    ob, cb = torch.cat(ob), torch.cat(cb)  # (N, L, H)

    def tops(sel) -> dict:
        d = ob[sel].mean(0) - cb[sel].mean(0)
        return {"in-context": _top(d, top), "parametric": _top(-d, top)}

    d = ob.mean(0) - cb.mean(0)
    half = len(items) // 2
    a, b = tops(slice(0, half)), tops(slice(half, None))
    return {
        "model": model_key(model),
        "identity": model_identity(model),  # a head set is only used for the model it was found on
        "dtype": dtype_name(model.dtype),
        "kind": kind,
        "procedure": "D = mean_OB-counterfactual R+_h(cf answer) - mean_CB R+_h(gold answer); R+ = positive AttnLRP "
                     "relevance at the o_proj input, summed over head dim and positions; first answer token",
        "data": {"split": SPLIT, "n_items": len(items), "seed": seed, "item_ids": [it["id"] for it in items]},
        "scores": {"D": d.tolist(), "mean_open_book": ob.mean(0).tolist(), "mean_closed_book": cb.mean(0).tolist()},
        "top_n": top,
        "top": tops(slice(None)),
        "stability": {k: {"overlap": len({tuple(p) for p in a[k]} & {tuple(p) for p in b[k]}), "of": top,
                          "halves": [half, len(items) - half]} for k in KINDS},
    }


def plot_heads(result: dict, path: str | Path) -> Path:
    """Heatmap (layer x head) of D with the chosen heads marked; written as PNG."""
    d = torch.tensor(result["scores"]["D"])
    lim = float(d.abs().max()) or 1.0
    fig = new_figure(figsize=(max(6.5, d.shape[1] * 0.5), max(4, d.shape[0] * 0.22)))
    ax = fig.subplots()
    im = ax.imshow(d, cmap="RdBu_r", vmin=-lim, vmax=lim, aspect="auto")
    for kind, marker in (("in-context", "o"), ("parametric", "s")):
        pts = result["top"][kind]
        ax.scatter([p[1] for p in pts], [p[0] for p in pts], marker=marker, facecolors="none", edgecolors="black",
                   label=f"top-{result['top_n']} {kind}")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_title(f"{result['model']}: D = open-book(cf) - closed-book head relevance\n"
                 f"(red: in-context, blue: parametric; n={result['data']['n_items']})", fontsize=9)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncol=2, fontsize=8)
    fig.colorbar(im, ax=ax, shrink=0.6)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    return path


def cmd_discover(args) -> int:
    if args.n_items < 2:
        raise AgdError(f"--n-items must be at least 2 (one half for each stability check), got {args.n_items}")
    check_writable(args.out, "--out")
    if args.plot:
        check_writable(args.plot, "--plot")
    model, tok = load_model(args.model, dtype=args.dtype, device=args.device)
    result = discover_heads(model, tok, n_items=args.n_items, top=args.top, seed=args.seed, kind=args.kind,
                            batch_size=args.batch_size)
    out = Path(args.out)
    out.write_text(json.dumps(result, indent=1))
    png = plot_heads(result, args.plot or out.with_suffix(".png"))
    print(f"top-{args.top} {args.kind} heads (layer, head): {result['top'][args.kind]}")
    s = result["stability"][args.kind]
    print(f"stability: {s['overlap']}/{s['of']} of the top heads agree between two disjoint halves {s['halves']}")
    print(f"written: {out}, {png}")
    return 0


def register_heads(sub) -> None:
    p = sub.add_parser("heads", help="attention-head ROIs: discover parametric / in-context heads")
    hs = p.add_subparsers(dest="heads_command", required=True)
    d = hs.add_parser("discover", help="score every head (Atlas procedure) and write the top ones as JSON + PNG",
                      description=__doc__)
    d.add_argument("--kind", choices=KINDS, default="parametric", help="which list 'heads:FILE' uses by default")
    d.add_argument("--model", default="smollm2", help="model to analyse (default smollm2)")
    d.add_argument("--device", default="cpu")
    d.add_argument("--dtype", default="auto", help=DTYPE_HELP)
    d.add_argument("--n-items", type=positive_int, default=200, help="NQ items (each: one open-book and one closed-book pass)")
    d.add_argument("--top", type=positive_int, default=10, help="heads per kind to keep (default 10)")
    d.add_argument("--seed", type=int, default=0, help="seed of the counterfactual answer assignment")
    d.add_argument("--out", required=True, help="output JSON")
    d.add_argument("--plot", help="output PNG (default: next to the JSON)")
    d.add_argument("--batch-size", type=positive_int, default=8, help="prompts attributed together (default 8)")
    d.set_defaults(func=cmd_discover)
