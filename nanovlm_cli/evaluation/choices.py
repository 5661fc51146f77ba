"""Multiple-choice options in a question and the option a free-form reply chooses.

`parse_options` reads the listed options ("A. red" per line, or MMStar's inline "Options: A: x, B: y"),
`question_stem` is the question without them, and `extract_choice` maps a reply to an option letter, a cascade from
strict to loose: the whole reply is a letter ("B", "(b)", "B."), the reply starts with one ("B. blue"), a phrase names
one ("the answer is B"), a parenthesised letter, the reply names exactly one option's text ("blue"), and finally one
standalone capital letter.
"""

from __future__ import annotations

import re

_OPTION_MARK = re.compile(r"(?<![A-Za-z0-9])\(?([A-H])\s*[.:)]\s+")


_OPTIONS_LABEL = re.compile(r"(?:options|choices)\s*:\s*$", re.IGNORECASE)


def _option_marks(question: str) -> list[re.Match[str]]:
    """The option markers of `question`: the longest run of consecutive letters from "A" (ties: the last); [] if <2."""
    marks = list(_OPTION_MARK.finditer(question))
    best: list[re.Match[str]] = []
    for start, mark in enumerate(marks):
        if mark.group(1) != "A":
            continue
        run = [mark]
        for nxt in marks[start + 1:]:
            if nxt.group(1) == chr(ord(run[-1].group(1)) + 1):
                run.append(nxt)
        if len(run) >= len(best):
            best = run
    return best if len(best) >= 2 else []


def parse_options(question: str) -> dict[str, str]:
    """The options listed in an MMStar-format question: {"A": "red", ...}; {} when none are found.

    Accepts one option per line ("A. red", "(B) blue", "C: green") and MMStar's inline "Options: A: x, B: y, ...".
    The longest run of consecutive letters starting at "A" wins, so a stray "A." in the question text is ignored.
    """
    best = _option_marks(question)
    options = {}
    for i, mark in enumerate(best):
        end = best[i + 1].start() if i + 1 < len(best) else len(question)
        text = question[mark.end():end]
        if i + 1 == len(best):
            text = text.split("\n")[0]  # the instruction may follow the last option
        options[mark.group(1)] = text.strip().rstrip(",;").strip()
    return options


def question_stem(question: str) -> str:
    """The question without its option list: the text before the first option marker, less an "Options:" label.

    >>> question_stem("What colour is the shape?\\nA. red\\nB. blue")
    'What colour is the shape?'
    >>> question_stem("Which is right?\\nOptions: A: x, B: y")
    'Which is right?'
    """
    marks = _option_marks(question)
    stem = question[:marks[0].start()] if marks else question
    return _OPTIONS_LABEL.sub("", stem.rstrip()).strip()


def normalise_text(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.lower()).split())


def match_option_text(text: str, options: dict[str, str]) -> str | None:
    said = normalise_text(text)
    if not said:
        return None
    normed = {letter: normalise_text(option) for letter, option in options.items() if normalise_text(option)}
    for letter, option in normed.items():
        if option == said:
            return letter
    hits = [letter for letter, option in normed.items() if re.search(rf"(?<!\w){re.escape(option)}(?!\w)", said)]
    # "dark red" mentioned: drop "red" when "dark red" is also an option that was hit
    hits = [h for h in hits if not any(o != h and normed[h] in normed[o] for o in hits)]
    return hits[0] if len(hits) == 1 else None


def _clean_tail(text: str, end: int) -> bool:
    """True when nothing word-like follows position `end` (a lowercase letter there is a letter, not "a ...")."""
    return re.match(r"[\s*_`'\")\].,:;!]*$", text[end:]) is not None


def extract_choice(prediction: str, options: dict[str, str] | None = None) -> str | None:
    """The option letter a free-form reply chooses, or None when it names none (or several).

    `options` (from `parse_options`) gives the valid letters and enables matching the option text; without it the
    letters are A-D.
    """
    letters = "".join(options) if options else "ABCD"
    text = prediction.strip()
    if not text:
        return None
    any_case = f"[{letters}{letters.lower()}]"
    # 1. the whole reply is a letter: "B", "(b)", "B.", "**B**", "[B]"
    m = re.fullmatch(rf"[\s*_`'\"(\[]*({any_case})[\s*_`'\")\].:,]*", text)
    if m:
        return m.group(1).upper()
    # 2. the reply starts with a letter and a delimiter: "B. blue", "(B) blue", "b) blue", "B: blue"
    m = re.match(rf"[\s*_`'\"]*(?:\(({any_case})\)|({any_case})\s*[.:)\]](?!\w))", text)
    if m:
        return (m.group(1) or m.group(2)).upper()
    # 3. a phrase names it: "Answer: B", "the answer is (b)", "the correct option is B", "I choose option C"
    for m in re.finditer(rf"\b(?:answer|option|choice)s?\b(?:\s+(?:is|would be|should be))?\s*[:：]?\s*"
                         rf"(?:option\s+|choice\s+)?[*_`'\"]*(\()?({any_case})(?![\w'])", text, re.IGNORECASE):
        letter = m.group(2)
        if letter.isupper() or m.group(1) or _clean_tail(text, m.end()):
            return letter.upper()
    # 4. parenthesised letters anywhere: "I think (C) is right"
    found = {x.upper() for x in re.findall(rf"\(({any_case})\)", text)}
    if len(found) == 1:
        return found.pop()
    # 5. the reply names exactly one option's text: "blue", "It is a blue square."
    if options:
        letter = match_option_text(text, options)
        if letter:
            return letter
    # 6. exactly one standalone capital letter (not the article "A word")
    found = {m.group(1) for m in re.finditer(rf"(?<![\w'])([{letters}])(?![\w'])", text)
             if not (m.group(1) == "A" and re.match(r"\s+[a-z]", text[m.end():]))}
    return found.pop() if len(found) == 1 else None
