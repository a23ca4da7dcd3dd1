"""Scores of one response: IFEval rule following, answer recall, and quality proxies.

No judge model is available offline, so quality is approximated by three proxies reported next to
accuracy: the mean token log-probability of the response under the (unguided) model given the
prompt, the rate of repeated word 4-grams, and the length.
"""
from __future__ import annotations

import re
import string
import unicodedata

import torch

from ..models import input_device
from .ifeval import checker

__all__ = ["score_rules", "normalize_answer", "recall", "recall_word", "score_qa", "repeat_rate",
           "response_logprob", "quality"]

_ARTICLES = re.compile(r"\b(a|an|the)\b")


def _check(instruction_id: str, kwargs: dict, prompt: str, response: str) -> bool:
    inst = checker().instructions_registry.INSTRUCTION_DICT[instruction_id](instruction_id)
    # Item files written from Hugging Face's IFEval carry every argument name, unset ones as None.
    inst.build_description(**{k: v for k, v in kwargs.items() if v is not None})
    args = inst.get_instruction_args()
    if args and "prompt" in args:  # as the reference evaluation does
        inst.build_description(prompt=prompt)
    return bool(response.strip()) and bool(inst.check_following(response))


def _loose_variants(response: str) -> list[str]:
    """The reference checker's loose variants: without the first/last line, without '*'."""
    lines = response.split("\n")
    cut = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(), "\n".join(lines[1:-1]).strip()]
    return cut + [r.replace("*", "") for r in cut]


def score_rules(instruction_ids: list[str], kwargs: list[dict], response: str, prompt: str = "") -> dict:
    """Check a response against IFEval instructions, strict and loose, as the reference evaluation does.

    The response is stripped first. A checker that raises counts as not followed, and the error is
    returned under ``"errors"`` so that it is never a silent zero.

    Example:
        >>> s = score_rules(["punctuation:no_comma"], [{}], "Hello world.")
        >>> s["prompt_strict"], s["inst_strict"]
        (True, [True])
    """
    response = response.strip()
    out = {"inst_strict": [], "inst_loose": [], "errors": {}}
    variants = _loose_variants(response)
    for iid, kw in zip(instruction_ids, kwargs):
        try:
            strict = _check(iid, kw or {}, prompt, response)
            loose = strict or any(_check(iid, kw or {}, prompt, v) for v in variants[1:])
        except Exception as e:  # noqa: BLE001 - a checker bug must show up in the record, not stop the run
            strict = loose = False
            out["errors"][iid] = f"{type(e).__name__}: {e}"
        out["inst_strict"].append(strict)
        out["inst_loose"].append(loose)
    out["prompt_strict"] = all(out["inst_strict"])
    out["prompt_loose"] = all(out["inst_loose"])
    return out


def normalize_answer(text: str) -> str:
    """SQuAD-style normalisation: lower case, no punctuation (any Unicode punctuation), no articles, single spaces.

    Example:
        >>> normalize_answer("The  U.S. Army's  band!")
        'us armys band'
    """
    text = text.lower()
    text = "".join(" " if c in "\n\t" else c for c in text
                   if c not in string.punctuation and not unicodedata.category(c).startswith("P"))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def recall(response: str, answers: list[str]) -> bool:
    """True if any normalised gold answer occurs in the normalised response (substring, as in SQuAD/NQ work).

    Substring matching is the literature's metric and is lenient: ``"no"`` matches ``"not"``; see
    :func:`recall_word` for the whole-word variant.

    Example:
        >>> recall("It was Paris, I think.", ["paris"]), recall("I do not know", ["no"])
        (True, True)
    """
    r = normalize_answer(response)
    return any(a and a in r for a in map(normalize_answer, answers))


def recall_word(response: str, answers: list[str]) -> bool:
    """Like :func:`recall`, but the answer must match whole words of the response.

    Example:
        >>> recall_word("I do not know", ["no"]), recall_word("No.", ["no"])
        (False, True)
    """
    r = f" {normalize_answer(response)} "
    return any(a and f" {a} " in r for a in map(normalize_answer, answers))


def score_qa(answers: list[str], response: str) -> dict:
    """Recall (substring) and whole-word recall of the gold ``answers`` in ``response``.

    Example:
        >>> score_qa(["Paris"], "The capital is Paris.")
        {'recall': True, 'recall_word': True}
    """
    return {"recall": recall(response, answers), "recall_word": recall_word(response, answers)}


def repeat_rate(text: str, n: int = 4) -> float:
    """Fraction of the word n-grams of ``text`` that repeat an earlier one (0 = no repetition).

    Example:
        >>> repeat_rate("a b c d a b c d")
        0.2
    """
    words = text.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else (len(grams) - len(set(grams))) / len(grams)


@torch.no_grad()
def response_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float | None:
    """Mean log-probability (nats per token) of ``response_ids`` under ``model`` given ``prompt_ids``.

    The plain model scores the response whatever method produced it, so methods are comparable.

    Example:
        >>> res = agdecode.generate(model, tok, messages)
        >>> response_logprob(model, res.prompt_ids, res.token_ids)
        -0.83
    """
    if not response_ids:
        return None
    device = input_device(model)
    ids = torch.tensor([list(prompt_ids) + list(response_ids)], device=device)
    logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1:-1].float()  # (n_response, V)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, len(prompt_ids):, None])
    return float(logp.mean())


def quality(text: str, n_tokens: int, logprob: float | None) -> dict:
    """The quality proxies of one response.

    Example:
        >>> quality("a b c d a b c d", 9, -1.2)
        {'logprob': -1.2, 'repeat4': 0.2, 'words': 8, 'tokens': 9}
    """
    return {"logprob": logprob, "repeat4": repeat_rate(text), "words": len(text.split()), "tokens": n_tokens}
