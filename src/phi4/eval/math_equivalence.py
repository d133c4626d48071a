"""Is a model's MATH answer the reference answer? Normalisation, then symbolic equivalence; no judge model.

Normalisation follows the conventions of the MATH release's own checker (Hendrycks et al.): drop
\\left/\\right, spacing commands, units and degree marks, a leading "x =", dollar signs; unify \\dfrac and
\\tfrac; add braces to \\frac12 and \\sqrt2; write .5 as 0.5. If the strings still differ, both sides are
read as sympy expressions, from a whitelist of tokens only (model output is never evaluated as Python),
and compared by value.
"""

from __future__ import annotations

import re

import sympy

_SAFE_EXPRESSION = re.compile(r"^[0-9a-z+\-*/^().,\s]*$")
_ALLOWED_NAMES = {"sqrt", "pi", "sin", "cos", "tan", "log", "exp", "ln"}


def last_boxed(text: str) -> str | None:
    """The contents of the last \\boxed{...} (or \\fbox{...}) in a solution, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    brace = text.find("{", start)
    if brace < 0:
        return None
    depth = 0
    for index in range(brace, len(text)):
        depth += {"{": 1, "}": -1}.get(text[index], 0)
        if depth == 0:
            return text[brace + 1 : index]
    return None


def _fix_fracs(text: str) -> str:
    # \frac12 -> \frac{1}{2}, \frac1{2} -> \frac{1}{2}
    return re.sub(r"\\frac(?:\{([^{}]*)\}|(\w))(?:\{([^{}]*)\}|(\w))",
                  lambda m: f"\\frac{{{m.group(1) or m.group(2)}}}{{{m.group(3) or m.group(4)}}}", text)


def normalize(answer: str) -> str:
    text = answer.strip()
    boxed = last_boxed(text)
    if boxed is not None:
        text = boxed
    text = text.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = text.replace("^{\\circ}", "").replace("^\\circ", "").replace("°", "")
    text = text.replace("\\$", "").replace("$", "").rstrip(".")
    text = re.sub(r"\\text\{\s*[a-zA-Z ]*\}$", "", text)  # trailing units
    text = re.sub(r"\\(?:text|mbox|mathrm)\{([^{}]*)\}", r"\1", text)
    text = text.replace("\\%", "").replace("%", "")
    text = re.sub(r"\\[,;: ]", "", text)
    text = text.replace(" ", "")
    text = re.sub(r"(?<![0-9])\.([0-9])", r"0.\1", text)
    if re.match(r"^[a-zA-Z]\w*=", text) and len(text.split("=")[0]) <= 2:
        text = text.split("=", 1)[1]
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    text = _fix_fracs(text)
    if re.fullmatch(r"-?\d+/\d+", text):
        numerator, denominator = text.split("/")
        text = f"\\frac{{{numerator}}}{{{denominator}}}"
    if re.fullmatch(r"\([A-Za-z]\)", text):  # a multiple-choice letter: (A) is A
        text = text[1]
    if text.endswith(".0") and text[:-2].lstrip("-").isdigit():
        text = text[:-2]
    return text


def _to_sympy(text: str) -> sympy.Expr | None:
    expression = text
    for _ in range(5):  # nested fractions and roots, innermost first
        expression = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", expression)
        expression = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", expression)
    expression = expression.replace("\\pi", "pi").replace("\\cdot", "*").replace("\\times", "*")
    expression = expression.replace("{", "(").replace("}", ")").replace("\\", "")
    expression = expression.lower()
    expression = re.sub(r"(\d)\s*(?=[a-z(])", r"\1*", expression)  # implicit products: 2sqrt(2), 3(x+1)
    expression = re.sub(r"\)\s*(?=[0-9a-z(])", ")*", expression)
    if len(expression) > 80 or not _SAFE_EXPRESSION.match(expression):
        return None
    if {word for word in re.findall(r"[a-z]+", expression) if len(word) > 1} - _ALLOWED_NAMES:
        return None  # single letters are variables; longer words only the known functions and constants
    # Powers only of small literal exponents: 2^(10^10) is refused, not computed.
    powers = re.findall(r"\^\s*(\(\s*-?\d{1,3}\s*\)|-?\d{1,3}(?![\d.^])|[a-z](?![a-z(^]))(?!\s*\^)", expression)
    if len(powers) != expression.count("^") or (expression.count("^") > 1 and ")^" in expression.replace(" ", "")):
        return None  # and no towers through parentheses: ((9^999)^999)^999
    try:
        return sympy.sympify(expression.replace("^", "**"), rational=True)
    except (sympy.SympifyError, SyntaxError, TypeError, ValueError, ZeroDivisionError):
        return None


def answers_match(candidate: str, reference: str) -> bool:
    left, right = normalize(candidate), normalize(reference)
    if left == right:
        return True
    if "," in left or "," in right:  # tuples and lists: element by element
        left_items, right_items = left.strip("()[]").split(","), right.strip("()[]").split(",")
        return len(left_items) == len(right_items) and len(left_items) > 1 and all(
            answers_match(a, b) for a, b in zip(left_items, right_items))
    a, b = _to_sympy(left), _to_sympy(right)
    if a is None or b is None:
        return False
    try:
        difference = sympy.simplify(a - b)
        return bool(difference == 0) or abs(complex(difference.evalf())) < 1e-9
    except (TypeError, ValueError, AttributeError):
        return False
