"""backend.text_processing.parsing.parse_prompt_attention(text, emphasis): the emphasis syntax (Forge:
backend/text_processing/parsing.py), written from its behaviour, independently of ti_trainer's parser (the
tests compare the two paths): `(a)` x1.1, `[a]` /1.1, `(a:w)` xw, backslash escapes, brackets left open apply
to the rest, `BREAK` becomes ["BREAK", -1], equal neighbours are joined. Emphasis "None" takes the text
literally: one fragment of weight 1.
"""

import re

_ELEMENT = re.compile(r"\\\(|\\\)|\\\[|\\]|\\\\|\\|\(|\[|:\s*([+-]?[.\d]+)\s*\)|\)|]|[^\\()\[\]:]+|:")
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text, emphasis):
    if emphasis == "None":
        return [[text, 1.0]]
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
