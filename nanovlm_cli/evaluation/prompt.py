"""The MMStar prompt: the exact user turn for a multiple-choice question, in training and in evaluation alike.

A leaf module (it imports nothing of the package): the shapes training data (`data/shapes.py`) asks its
multiple-choice questions with it, so a model trained there answers MMStar's format as it is scored.
"""

from __future__ import annotations

MMSTAR_INSTRUCTION = "Answer with the option's letter from the given choices directly."


def mmstar_prompt(question: str) -> str:
    """The exact user prompt for an MMStar-format question (options already listed in `question`).

    >>> mmstar_prompt("What colour is the shape?\\nA. red\\nB. blue\\nC. green\\nD. pink")
    "What colour is the shape?\\nA. red\\nB. blue\\nC. green\\nD. pink\\nAnswer with the option's letter from the given choices directly."
    """
    return f"{question.rstrip()}\n{MMSTAR_INSTRUCTION}"
