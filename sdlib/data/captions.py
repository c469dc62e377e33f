"""Captions of class datasets, and the class a prompt names.

Class datasets have no captions of their own: every image of class k is paired with all the template captions of
k, so a prompt in any of these phrasings is in the training distribution. `prompt_label` reads a prompt back to
its class, for conditional accuracy.
"""
from __future__ import annotations

import re
from typing import Sequence

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Captions of digit class k: {digit} is "8", {name} is "eight". Every image is paired with all of them, so a prompt
# in any of these phrasings is in the training distribution.
DIGIT_TEMPLATES = ("{digit}", "{name}", "the digit {digit}", "a handwritten {digit}", "a handwritten digit {name}",
                   "the number {name}")
# Captions of other class datasets: {name} is the lower-cased class name, {a_name} it with its article ("an airplane").
CLASS_TEMPLATES = ("{name}", "{a_name}", "a photo of {a_name}", "an image of {a_name}")
# A source's own captions of its classes, after CLASS_TEMPLATES (flowers102: CLIP's zero-shot prompt for it).
SOURCE_TEMPLATES = {"flowers102": ("a photo of {a_name}, a type of flower",)}


def templates(source: str, digits: bool) -> tuple[str, ...]:
    """The caption templates of a class dataset: DIGIT_TEMPLATES when `digits`, else CLASS_TEMPLATES and the
    source's own."""
    return DIGIT_TEMPLATES if digits else CLASS_TEMPLATES + SOURCE_TEMPLATES.get(source, ())


def class_captions(label: int, classes: Sequence[str], digits: bool, source: str = "") -> list[str]:
    """Every template caption of class `label` of `source` (see `templates`)."""
    if digits:
        return [t.format(digit=label, name=classes[label]) for t in DIGIT_TEMPLATES]
    name = classes[label].lower()
    a_name = f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return [t.format(name=name, a_name=a_name) for t in templates(source, digits)]


def prompt_label(prompt: str, classes: Sequence[str], digits: bool) -> int | None:
    """The class a prompt names in any template phrasing and case ("8", " Eight ", "a handwritten digit eight").

    None when it names no class or several different ones.
    """
    text = " ".join(prompt.lower().split())
    found: set[int] = set()
    # Longest names first, each blanked once matched, so "t-shirt/top" is not also read as "shirt".
    for k in sorted(range(len(classes)), key=lambda k: -len(classes[k])):
        name = " ".join(classes[k].lower().split())
        text, hits = re.subn(rf"(?<!\w){re.escape(name)}(?!\w)", " ", text)
        if hits:
            found.add(k)
    if digits:
        found |= {int(d) for d in re.findall(r"(?<!\w)\d(?!\w)", text) if int(d) < len(classes)}
    return found.pop() if len(found) == 1 else None
