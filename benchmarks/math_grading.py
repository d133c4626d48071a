"""How often each MATH grader agrees with the expected verdict on tests/data/math_grading_corpus.json (176
tricky reference/answer pairs: thousands separators, reordered solutions and products, equations, interval
brackets, matrices, text answers, units, bases, markdown and prose around the answer, and more).

Three graders, same pairs:
- phi4: simple-evals' extraction, then math-verify in a worker with a time limit (phi4/eval/math_grader.py);
- math-verify alone, two ways: `verify(parse("$reference$"), parse(answer))` on the raw answer as a user
  would call it, and with the answer wrapped as `$answer$` too (its best case without extraction);
- Hendrycks-style string match: the MATH release's normalisation (`strip_string`), then string equality.
Prints one JSON line per grader and the pairs each gets wrong. Usage: python benchmarks/math_grading.py
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from phi4.eval.math_grader import MathGrader, last_boxed

CORPUS = Path(__file__).resolve().parent.parent / "tests" / "data" / "math_grading_corpus.json"


def answer_text(item: dict) -> str:
    """A reply as the model wrote it: full replies as they are, bare answers on an Answer line."""
    return item["candidate"] if item["category"] == "reply" else f"Answer: {item['candidate']}"


def hendrycks_strip(text: str) -> str:
    """The normalisation of Hendrycks et al.'s MATH checker, re-expressed: spacing, \\left/\\right, degree
    marks, dollar signs, units, `x =`, leading zeros of decimals, \\frac12 and \\sqrt2."""
    boxed = last_boxed(text)
    text = (boxed if boxed is not None else text).strip()
    for old, new in (("\n", ""), ("\\!", ""), ("\\\\", "\\"), ("tfrac", "frac"), ("dfrac", "frac"), ("\\left", ""),
                     ("\\right", ""), ("^{\\circ}", ""), ("^\\circ", ""), ("\\$", ""), ("$", ""),
                     ("\\%", ""), ("%", "")):
        text = text.replace(old, new)
    text = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", text).rstrip(".")
    text = re.sub(r"(?<![0-9])\.([0-9])", r"0.\1", text.replace(" ", ""))
    if re.match(r"^[a-zA-Z]\w*=", text) and len(text.split("=")[0]) <= 2:
        text = text.split("=", 1)[1]
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    if re.fullmatch(r"-?\d+/\d+", text):
        numerator, denominator = text.split("/")
        text = f"\\frac{{{numerator}}}{{{denominator}}}"
    return text


def main() -> None:
    from math_verify import parse, verify

    corpus = json.loads(CORPUS.read_text())
    grader = MathGrader()
    graders = {
        "phi4": lambda item: grader.grade(item["reference"], answer_text(item)).correct,
        "math_verify_alone": lambda item: bool(verify(parse(f"${item['reference']}$"), parse(item["candidate"]),
                                                      timeout_seconds=5)),
        "math_verify_alone_wrapped": lambda item: bool(verify(parse(f"${item['reference']}$"),
                                                              parse(f"${item['candidate']}$"), timeout_seconds=5)),
        "hendrycks_string_match": lambda item: hendrycks_strip(item["candidate"]) == hendrycks_strip(item["reference"]),
    }
    try:
        for name, grade in graders.items():
            wrong = [item for item in corpus if grade(item) != item["equivalent"]]
            print(json.dumps({"grader": name, "pairs": len(corpus), "agree": len(corpus) - len(wrong),
                              "agreement": round(1 - len(wrong) / len(corpus), 3),
                              "wrong": [(w["reference"], w["candidate"], w["equivalent"]) for w in wrong]},
                             ensure_ascii=False))
    finally:
        grader.close()


if __name__ == "__main__":
    main()
