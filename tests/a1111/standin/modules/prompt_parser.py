"""modules.prompt_parser.parse_prompt_attention: the WebUI's emphasis syntax, for the stand-in's text path.

Written from A1111's documented behaviour, independently of ti_trainer/prompt_parser.py (the tests compare the
two paths, so they must not share code): `(a)` x1.1, `[a]` /1.1, `(a:w)` xw, a backslash escapes a bracket,
brackets left open apply to the rest of the prompt, `BREAK` becomes ["BREAK", -1], neighbours with equal
weights are joined.
"""

import re

# One syntax element per match; group 1 is the number of an explicit "(text:weight)".
_ELEMENT = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text):
    fragments = []
    opened_round, opened_square = [], []

    def scale(first, factor):
        for fragment in fragments[first:]:
            fragment[1] *= factor

    for match in _ELEMENT.finditer(text):
        element, explicit = match.group(0), match.group(1)
        if element[0] == "\\":
            fragments.append([element[1:], 1.0])
        elif element == "(":
            opened_round.append(len(fragments))
        elif element == "[":
            opened_square.append(len(fragments))
        elif explicit is not None and opened_round:
            scale(opened_round.pop(), float(explicit))
        elif element == ")" and opened_round:
            scale(opened_round.pop(), 1.1)
        elif element == "]" and opened_square:
            scale(opened_square.pop(), 1 / 1.1)
        else:
            pieces = _BREAK_WORD.split(element)
            fragments.append([pieces[0], 1.0])
            for piece in pieces[1:]:
                fragments += [["BREAK", -1], [piece, 1.0]]

    for first in opened_round:
        scale(first, 1.1)
    for first in opened_square:
        scale(first, 1 / 1.1)

    if not fragments:
        return [["", 1.0]]
    joined = [fragments[0]]
    for fragment in fragments[1:]:
        if fragment[1] == joined[-1][1]:
            joined[-1][0] += fragment[0]
        else:
            joined.append(fragment)
    return joined


class SdConditioning(list):
    """A list of prompts that also carries what SDXL's conditioning needs: the image's width and height, and
    whether these are negative prompts. Unset fields are taken from `copy_from` (default: the prompts)."""

    def __init__(self, prompts, is_negative_prompt=False, width=None, height=None, copy_from=None):
        super().__init__()
        self.extend(prompts)
        source = prompts if copy_from is None else copy_from
        self.is_negative_prompt = is_negative_prompt or getattr(source, "is_negative_prompt", False)
        self.width = width or getattr(source, "width", None)
        self.height = height or getattr(source, "height", None)
