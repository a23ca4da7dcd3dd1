"""Build the multi-turn rule-following set (``src/agdecode/data/rules_multiturn.jsonl``).

Each of the 210 items of the single-turn set (``rules_dev.jsonl``, same ids, same rules, same final
task) gets an earlier exchange between its system message and its own task:

    system     the item's rules (IFEval instructions, the checker's own wording; unchanged)
    user       an earlier request: another bare task of ``rules_tasks.py``
    assistant  a reply to it that follows every one of the system's rules
    user       the item's own task (scored: the model's reply to it, with the same checker)

The earlier reply is *constructed*, not sampled: a small writer (``compose``) lays out generic
sentences so that each rule type holds by construction (layout for paragraphs, sections, bullets,
JSON, two responses; inserted keywords, placeholders, highlights, capital words, letters; title,
postscript, end phrase, quotation marks, case; a sentence bank per language for the language rule).
Every constructed reply is then **checked with the IFEval checker** (strict, ``score_rules``), and
only a passing one is kept. The writer tries a fixed sequence of layouts (how many sentences, how
long) and, where none passes, the next candidate earlier task (a seeded order over the other
tasks); an item whose rules no construction satisfies is dropped and reported. The replies are
demonstrations of the rules being kept, with generic content: they are not good answers to their
request, and the evaluation does not score them.

Why constructed rather than greedy-decoded with the rules restated: it is deterministic, needs no
model, and passes for every satisfiable rule combination; greedy SmolLM2 keeps every rule of only
15 % of the items (docs/results.md).

Six items of ``rules_dev.jsonl`` have rules that no reply can satisfy, and are left out: rules-007
(all capitals, but sections marked "Section N", matched case-sensitively), rules-047 (fewer than 1
sentence), rules-090, -103, -133, -171 (paragraph n must start with a word, n > the paragraphs
required).

Run: ``.venv/bin/python scripts/build_rules_multiturn.py`` (deterministic; rewrites the file; about
15 s). ``tests/test_multiturn.py`` re-checks every earlier reply in the committed file.
"""
from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from rules_tasks import TASKS  # noqa: E402

from agdecode.eval.scoring import score_rules  # noqa: E402

SEED = 20251016
DATA = Path(__file__).resolve().parent.parent / "src" / "agdecode" / "data"
N_CANDIDATE_TASKS = 40

# Generic sentences of a reply, without commas and without the word "I" (a capital word).
BANK = {
    "en": [
        "Here is a short answer to your request.",
        "The main idea is simple to follow.",
        "Start with the basic facts and build from there.",
        "Each part depends on the one before it.",
        "A clear example often helps the most.",
        "Small details can change the whole picture.",
        "Most people find this easier than they expect.",
        "Take your time and read each point slowly.",
        "The key is to stay patient and curious.",
        "Think of it as a chain of small steps.",
        "Good habits make the process much smoother.",
        "There is more to learn if you want to go deeper.",
        "Try it once and the rest will make sense.",
        "This is the part that matters most in practice.",
        "You can always come back to it later.",
        "That is the heart of the matter.",
    ],
    "es": ["Esta es una respuesta breve a tu pregunta.", "La idea principal es sencilla.",
           "Cada paso depende del anterior.", "Un buen ejemplo ayuda mucho.",
           "Espero que esta explicación te sea útil.", "Hay mucho más que aprender si quieres profundizar.",
           "Lo más importante es tener paciencia."],
    "fr": ["Voici une réponse courte à votre question.", "L'idée principale est simple.",
           "Chaque étape dépend de la précédente.", "Un bon exemple aide beaucoup.",
           "J'espère que cette explication vous sera utile.", "Il reste beaucoup à apprendre si vous voulez aller plus loin.",
           "Le plus important est de rester patient."],
    "pl": ["To jest krótka odpowiedź na twoje pytanie.", "Główna idea jest bardzo prosta.",
           "Każdy krok zależy od poprzedniego.", "Dobry przykład bardzo pomaga.",
           "Mam nadzieję że to wyjaśnienie będzie pomocne.", "Najważniejsza jest cierpliwość.",
           "Warto wrócić do tego tematu później."],
    "ja": ["これはあなたの質問への短い答えです。", "主な考え方はとても簡単です。", "それぞれの段階は前の段階に基づいています。",
           "良い例はとても役に立ちます。", "この説明が役に立つことを願っています。", "もっと深く学びたいなら学ぶことはたくさんあります。",
           "一番大切なのは焦らないことです。"],
    "ko": ["이것은 당신의 질문에 대한 짧은 답변입니다.", "주요 생각은 아주 간단합니다.", "각 단계는 이전 단계에 달려 있습니다.",
           "좋은 예는 많은 도움이 됩니다.", "이 설명이 도움이 되기를 바랍니다.", "더 깊이 배우고 싶다면 배울 것이 많습니다.",
           "가장 중요한 것은 인내심입니다."],
    "th": ["นี่คือคำตอบสั้นๆ สำหรับคำถามของคุณ", "แนวคิดหลักนั้นง่ายมาก", "แต่ละขั้นตอนขึ้นอยู่กับขั้นตอนก่อนหน้า",
           "ตัวอย่างที่ดีช่วยได้มาก", "หวังว่าคำอธิบายนี้จะเป็นประโยชน์กับคุณ", "ถ้าอยากเรียนรู้เพิ่มเติมยังมีอีกมากมาย",
           "สิ่งที่สำคัญที่สุดคือความอดทน"],
    "fa": ["این یک پاسخ کوتاه به سؤال شما است.", "ایده اصلی بسیار ساده است.", "هر مرحله به مرحله قبلی بستگی دارد.",
           "یک مثال خوب بسیار کمک می‌کند.", "امیدوارم این توضیح برای شما مفید باشد.", "اگر می‌خواهید بیشتر بدانید چیزهای زیادی برای یادگیری هست.",
           "مهم‌ترین چیز صبر است."],
    "bn": ["এটি আপনার প্রশ্নের একটি ছোট উত্তর।", "মূল ধারণাটি খুব সহজ।", "প্রতিটি ধাপ আগের ধাপের উপর নির্ভর করে।",
           "একটি ভালো উদাহরণ অনেক সাহায্য করে।", "আশা করি এই ব্যাখ্যাটি আপনার কাজে লাগবে।", "আরও জানতে চাইলে শেখার অনেক কিছু আছে।",
           "সবচেয়ে গুরুত্বপূর্ণ হলো ধৈর্য।"],
    "ne": ["यो तपाईंको प्रश्नको छोटो उत्तर हो।", "मुख्य विचार धेरै सरल छ।", "हरेक चरण अघिल्लो चरणमा भर पर्छ।",
           "राम्रो उदाहरणले धेरै मद्दत गर्छ।", "आशा छ यो व्याख्या तपाईंलाई उपयोगी हुनेछ।", "अझ जान्न चाहनुहुन्छ भने सिक्न धेरै कुरा छन्।",
           "सबैभन्दा महत्त्वपूर्ण कुरा धैर्य हो।"],
    "ta": ["இது உங்கள் கேள்விக்கு ஒரு சிறிய பதில்.", "முக்கிய யோசனை மிகவும் எளிமையானது.", "ஒவ்வொரு படியும் முந்தைய படியைப் பொறுத்தது.",
           "ஒரு நல்ல உதாரணம் மிகவும் உதவுகிறது.", "இந்த விளக்கம் உங்களுக்கு உதவும் என்று நம்புகிறேன்.",
           "மேலும் அறிய விரும்பினால் கற்றுக்கொள்ள நிறைய இருக்கிறது.", "பொறுமைதான் மிக முக்கியமானது."],
    "te": ["ఇది మీ ప్రశ్నకు ఒక చిన్న సమాధానం.", "ప్రధాన ఆలోచన చాలా సులభం.", "ప్రతి దశ మునుపటి దశపై ఆధారపడి ఉంటుంది.",
           "మంచి ఉదాహరణ చాలా సహాయపడుతుంది.", "ఈ వివరణ మీకు ఉపయోగపడుతుందని ఆశిస్తున్నాను.",
           "మరింత తెలుసుకోవాలంటే నేర్చుకోవడానికి చాలా ఉంది.", "ఓపిక చాలా ముఖ్యమైనది."],
}
TITLE = {"en": "A Short Answer", "es": "Una respuesta breve", "fr": "Une réponse courte", "pl": "Krótka odpowiedź",
         "ja": "短い答え", "ko": "짧은 답변", "th": "คำตอบสั้นๆ", "fa": "پاسخ کوتاه", "bn": "ছোট উত্তর",
         "ne": "छोटो उत्तर", "ta": "சிறிய பதில்", "te": "చిన్న సమాధానం"}
PLACEHOLDERS = ["name", "address", "date", "city", "phone", "email", "company", "time", "street", "country"]
# Layouts tried in order: (number of body sentences, sentences joined into one).
LAYOUTS = [(5, 1), (3, 1), (8, 1), (2, 1), (12, 1), (1, 1), (16, 1), (24, 1), (8, 2), (12, 3), (18, 4), (24, 6),
           (30, 10), (4, 2), (6, 3)]


def _has_word(text: str, word: str) -> bool:
    return re.search(r"\b" + re.escape(word) + r"\b", text, flags=re.IGNORECASE) is not None


def _join(sentences: list[str]) -> str:
    """Several English sentences as one: "A. B. C." -> "A and b and c." (no comma)."""
    parts = [s.rstrip(".") for s in sentences]
    return " and ".join([parts[0]] + [p[0].lower() + p[1:] for p in parts[1:]]) + "."


def _split(xs: list, k: int) -> list[list]:
    n, r = divmod(len(xs), k)
    out, i = [], 0
    for j in range(k):
        m = n + (j < r)
        out.append(xs[i:i + m])
        i += m
    return out


def compose(rules: dict[str, dict], request: str, n: int, join: int, start: int = 0) -> str | None:
    """A reply to ``request`` built to follow ``rules`` ({instruction id: kwargs}), or None if this layout cannot.

    ``n`` body sentences (``join`` of them fused into one), taken from the sentence bank from
    ``start`` on. The caller must check the result with the IFEval checker.

    Example:
        >>> compose({"punctuation:no_comma": {}, "detectable_format:title": {}}, "Explain tides.", 3, 1)
        '<<A Short Answer>>\\nHere is a short answer to your request. The main idea is simple to follow. ...'
    """
    lang = rules.get("language:response_language", {}).get("language", "en")
    if lang not in BANK or (join > 1 and lang != "en"):
        return None
    avoid = list(rules.get("keywords:forbidden_words", {}).get("forbidden_words", []))
    freq = rules.get("keywords:frequency")
    if freq and freq["relation"] == "less than":
        avoid.append(freq["keyword"])
    rest = BANK[lang][1:]  # the opener first, then the others from ``start`` on
    bank = BANK[lang][:1] + rest[start % len(rest):] + rest[:start % len(rest)]
    bank = [s for s in bank if not any(_has_word(s, w) or w.lower() in s.lower() for w in avoid)]
    letter = rules.get("keywords:letter_frequency")
    if letter and letter["let_relation"] == "less than":
        bank.sort(key=lambda s: s.lower().count(letter["letter"]))
    if not bank:
        return None
    body = [bank[i % len(bank)] for i in range(n * join)]
    if join > 1:
        body = [_join(body[i:i + join]) for i in range(0, len(body), join)]

    # Content that some rules ask for, each as one sentence after the first.
    extra = []
    if "keywords:existence" in rules:
        extra.append("This also touches on " + " and ".join(rules["keywords:existence"]["keywords"]) + ".")
    if freq and freq["relation"] == "at least":
        extra.append("Let me say " + " and ".join([freq["keyword"]] * freq["frequency"]) + " again.")
    if letter and letter["let_relation"] == "at least":
        words = [w for w in _letter_words(letter["letter"]) if not any(_has_word(w, a) for a in avoid)]
        picked, count = [], 0
        for w in words:
            if count >= letter["let_frequency"]:
                break
            picked.append(w)
            count += w.count(letter["letter"])
        if count < letter["let_frequency"]:
            return None
        extra.append("A few related words are " + " and ".join(picked) + ".")
    if "detectable_content:number_placeholders" in rules:
        k = rules["detectable_content:number_placeholders"]["num_placeholders"]
        extra.append("Please fill in " + " and ".join(f"[{PLACEHOLDERS[i % len(PLACEHOLDERS)]}]" for i in range(k)) + ".")
    body = body[:1] + extra + body[1:]

    words = [s.split(" ") for s in body]
    if "detectable_format:number_highlighted_sections" in rules:
        if not _mark(words, rules["detectable_format:number_highlighted_sections"]["num_highlights"], lambda w: f"*{w}*"):
            return None
    cap = rules.get("change_case:capital_word_frequency")
    if cap and cap["capital_relation"] == "at least":
        if not _mark(words, cap["capital_frequency"], str.upper):
            return None
    body = [" ".join(ws) for ws in words]

    if "detectable_format:json_format" in rules:
        return json.dumps({"answer": " ".join(body)}, ensure_ascii=False)

    bullets: list[str] = []
    nb = rules.get("detectable_format:number_bullet_lists", {}).get("num_bullets")
    if nb:
        if len(body) <= nb:
            return None
        bullets, body = [f"* {s}" for s in body[-nb:]], body[:-nb]
    sections = rules.get("detectable_format:multiple_sections")
    nth = rules.get("length_constraints:nth_paragraph_first_word")
    stars = rules.get("length_constraints:number_paragraphs", {}).get("num_paragraphs")
    if sections:
        k, joiner = sections["num_sections"], "\n\n"
    elif stars:
        k, joiner = stars, "\n***\n"
    elif nth:
        k, joiner = nth["num_paragraphs"], "\n\n"
    elif "combination:two_responses" in rules:
        k, joiner = 2, "\n******\n"
    else:
        k, joiner = max(1, (len(body) + 3) // 4), "\n\n"
    if len(body) < k:
        return None
    groups = [" ".join(g) for g in _split(body, k)]
    if sections:
        groups = [f"{sections['section_spliter']} {i}\n{g}" for i, g in enumerate(groups, 1)]
    if nth:
        if nth["nth_paragraph"] > len(groups):
            return None
        w = nth["first_word"]
        groups[nth["nth_paragraph"] - 1] = f"{w[0].upper() + w[1:]} is where this part begins. " + groups[nth["nth_paragraph"] - 1]
    if bullets:
        groups[-1] += "\n" + "\n".join(bullets)
    if "detectable_format:title" in rules:
        if nth and nth["nth_paragraph"] == 1:
            groups[0] += f"\n<<{TITLE[lang]}>>"
        else:
            groups[0] = f"<<{TITLE[lang]}>>\n" + groups[0]
    text = joiner.join(groups)
    if "combination:repeat_prompt" in rules:
        text = request + "\n" + text
    if "detectable_content:postscript" in rules:
        marker = rules["detectable_content:postscript"]["postscript_marker"]
        text += f"\n{'P.P.S.' if marker == 'P.P.S' else marker} {BANK[lang][-1]}"
    if "startend:end_checker" in rules:
        text += " " + rules["startend:end_checker"]["end_phrase"]
    if "change_case:english_lowercase" in rules:
        text = text.lower()
    if "change_case:english_capital" in rules:
        text = text.upper()
    if "startend:quotation" in rules:
        text = f'"{text}"'
    return text


def _letter_words(letter: str) -> list[str]:
    from agdecode.eval.ifeval import checker

    words = checker().instructions_util.WORD_LIST
    return sorted((w for w in words if letter in w and len(w) > 2), key=lambda w: (-w.count(letter), w))


def _mark(words: list[list[str]], k: int, f) -> bool:
    """Apply ``f`` to ``k`` plain words, never a sentence's first word, round robin over sentences."""
    slots = [[j for j in range(1, len(ws)) if ws[j].isalpha() and len(ws[j]) > 3]
             + [j for j in range(1, len(ws)) if ws[j].isalpha() and len(ws[j]) in (2, 3)] for ws in words]
    done, rnd = 0, 0
    while done < k:
        progressed = False
        for i, s in enumerate(slots):
            if rnd < len(s) and done < k:
                words[i][s[rnd]] = f(words[i][s[rnd]])
                done += 1
                progressed = True
        if not progressed:
            return False
        rnd += 1
    return True


def passing_reply(ids: list[str], kwargs: list[dict], request: str, start: int = 0) -> str | None:
    """The first constructed reply to ``request`` that the IFEval checker passes (strict), or None.

    Example:
        >>> passing_reply(["punctuation:no_comma"], [{}], "Explain tides.")
        'Here is a short answer to your request. The main idea is simple to follow. ...'
    """
    rules = dict(zip(ids, kwargs))
    if "combination:repeat_prompt" in rules:
        rules["combination:repeat_prompt"] = {"prompt_to_repeat": request}
    check_kwargs = [rules[i] for i in ids]
    for n, join in LAYOUTS:
        reply = compose(rules, request, n, join, start)
        if reply is None:
            continue
        # The checker's sentence splitter knows only ". ! ?": a Japanese full stop ends no sentence for it.
        for text in dict.fromkeys([reply, reply.replace("。", ".")]):
            if score_rules(ids, check_kwargs, text, prompt=request)["prompt_strict"]:
                return text
    return None


def earlier_turn(item: dict, index: int, request_suffix: str = "") -> tuple[str, str] | None:
    """(earlier request, passing reply) for an item: the first candidate task, in a seeded order, that works.

    ``request_suffix`` is appended to the earlier request (the conflict set puts its contradicting
    instruction there).
    """
    rng = random.Random(f"{SEED}:{item['id']}")
    others = [t for t in TASKS if t != item["task"]]
    for task in rng.sample(others, N_CANDIDATE_TASKS):
        request = f"{task} {request_suffix}".strip()
        reply = passing_reply(item["instruction_id_list"], item["kwargs"], request, start=index)
        if reply is not None:
            return request, reply
    return None


def build() -> tuple[list[dict], list[str]]:
    """The multi-turn items, and the ids of the items no construction could satisfy."""
    items, dropped = [], []
    for i, line in enumerate((DATA / "rules_dev.jsonl").read_text().splitlines()):
        item = json.loads(line)
        turn = earlier_turn(item, i)
        if turn is None:
            dropped.append(item["id"])
            continue
        system, user = item["messages"]
        items.append({**{k: v for k, v in item.items() if k != "messages"}, "setting": "multiturn",
                      "messages": [system, {"role": "user", "content": turn[0]},
                                   {"role": "assistant", "content": turn[1]}, user]})
    return items, dropped


def main() -> None:
    items, dropped = build()
    path = DATA / "rules_multiturn.jsonl"
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items))
    print(f"{path}: {len(items)} items; dropped (no passing earlier reply): {dropped or 'none'}")


if __name__ == "__main__":
    main()
