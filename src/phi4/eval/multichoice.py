"""Which letter a multiple-choice reply chose, exactly as OpenAI's simple-evals decides it, per benchmark.

simple-evals treats its two multiple-choice benchmarks differently, and a score only reproduces theirs
when each keeps its own rule:

- MMLU normalises the reply first (markdown bold, `$`, `\\boxed`, `\\text`, braces gone), then tries
  "Answer:" in many languages, in a fixed order, taking the first pattern that matches anywhere; the
  letter is compared as written, so `answer: b` is not credited.
- GPQA applies one plain pattern to the raw reply: `Answer: B`, `Answer: $B$`, case as written.

`lenient` (opt-in, named in the results) adds the forms careful graders also accept: bold or code around
the letter, `(B)`, "the answer is B", a last line that is only the letter. It is never the default.
"""

from __future__ import annotations

import re

EXTRACTIONS = ("simple-evals", "lenient")

# simple-evals' common.py
ANSWER_PATTERN_MULTICHOICE = re.compile(r"(?i)Answer[ \t]*:[ \t]*\$?([A-D])\$?")
MULTILINGUAL_ANSWER_PATTERN_TEMPLATE = "(?i){}[ \t]*([A-D]|[أ-د]|[অ]|[ব]|[ড]|[ঢ]|[Ａ]|[Ｂ]|[Ｃ]|[Ｄ])"
MULTILINGUAL_ANSWER_REGEXES = (
    r"Answer\s*:",
    "Answer\\s*:\u200b\u200b\u200b\u200b\u200b\u200b",  # simple-evals' entry with Korean invisible characters
    r"উত্তর\s*:",
    r"उत्तर\s*:",
    r"উত্তরঃ",
    r"উত্তর\s*:",
    r"Antwort\s*:",
    r"답변\s*:",
    r"정답\s*:",
    r"답\s*:",
    r"答案\s*：",
    r"答案\s*:",
    r"答\s*：",
    r"答\s*:",
    r"答复\s*：",
    r"答曰\s*：",
    r"الإجابة:",
    r"الجواب:",
    r"إجابة:",
    r"الإجابة النهائية:",
    r"الإجابة الصحيحة:",
    r"الإجابة الصحيحة هي:",
    r"الإجابة هي:",
    r"الجواب النهائي:",
    r"Respuesta\s*:",
    r"Risposta\s*:",
    r"答え\s*:",
    r"答え\s*：",
    r"回答\s*:",
    r"回答\s*：",
    r"解答\s*:",
    r"Jawaban\s*:",
    r"Réponse\s*:",
    r"Resposta\s*:",
    r"Jibu\s*:",
    r"Idahun\s*:",
    r"Ìdáhùn\s*:",
    r"Idáhùn\s*:",
    r"Àmọ̀nà\s*:",
    r"Àdáhùn\s*:",
    r"Ànúgọ\s*:",
    r"Àṣàyàn\s*:",
)
MULTILINGUAL_PATTERNS = tuple(re.compile(MULTILINGUAL_ANSWER_PATTERN_TEMPLATE.format(answer))
                              for answer in MULTILINGUAL_ANSWER_REGEXES)
# normalize_response's replacements, in their order (order matters: "$\boxed{" before "$")
RESPONSE_NORMALISATION = ("**", "$\\boxed{", "}$", "\\$", "$\\text{", "$", "\\mathrm{", "\\{", "\\text", "\\(",
                          "\\mathbf{", "{", "\\boxed")
# normalize_extracted_answer: Arabic, Bengali and full-width letters read as A-D
LETTER_FORMS = str.maketrans({"أ": " A", "ب": " B", "ج": " C", "د": " D", "অ": " A", "ব": " B", "ড": " C",
                              "ঢ": " D", "Ａ": " A", "Ｂ": " B", "Ｃ": " C", "Ｄ": " D"})

LENIENT_PATTERNS = (
    re.compile(r"\b(?i:answer)(?:\s+is)?\s*[:：]?[\s\*_`]*\(?([A-D])\)?(?![A-Za-z])"),
    re.compile(r"(?m)^[\s\*_`]*\(?([A-D])\)?[\s\*_`.]*$"),
)


def normalize_response(response: str) -> str:
    for mark in RESPONSE_NORMALISATION:
        response = response.replace(mark, "")
    return response


def extract_mmlu(response: str) -> str | None:
    text = normalize_response(response)
    for pattern in MULTILINGUAL_PATTERNS:
        match = pattern.search(text)
        if match:
            return match.group(1).translate(LETTER_FORMS).strip()
    return None


def extract_gpqa(response: str) -> str | None:
    match = ANSWER_PATTERN_MULTICHOICE.search(response)
    return match.group(1) if match else None


def extract_lenient(benchmark: str, response: str) -> str | None:
    """simple-evals' letter when it finds one in A-D; else the last letter another accepted form names (a
    reply that reconsiders ends with its final choice)."""
    strict = extract_mmlu(response) if benchmark == "mmlu" else extract_gpqa(response)
    if strict in ("A", "B", "C", "D"):
        return strict
    text = normalize_response(response)
    for pattern in LENIENT_PATTERNS:
        letters = pattern.findall(text)
        if letters:
            return letters[-1]
    return None


def extract_choice(benchmark: str, response: str, extraction: str = "simple-evals") -> str | None:
    if extraction == "lenient":
        return extract_lenient(benchmark, response)
    if extraction != "simple-evals":
        raise ValueError(f"unknown extraction {extraction!r}; one of {', '.join(EXTRACTIONS)}")
    return extract_mmlu(response) if benchmark == "mmlu" else extract_gpqa(response)
