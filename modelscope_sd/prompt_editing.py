"""A1111's prompt editing: a prompt that changes during sampling.

``[from:to:when]`` reads ``from`` up to step ``when``, then ``to``; ``[to:when]`` adds ``to`` after it, and
``[from::when]`` removes ``from`` after it. ``when`` is a step number, or with a decimal point a fraction of the
steps (``0.5``: halfway). ``[a|b]`` alternates every step. They nest, and hold emphasis: ``[cat:(dog:1.2):0.5]``.

This follows A1111's ``prompt_parser`` (its grammar and schedule, its step counter) without lark: steps count the
UNet calls of a pass, from 0, and a text whose step is ``when`` still reads ``from``. In the hires fix's second
pass a fraction above 1 is a fraction of that pass (``1.5``: halfway through it), a fraction below 1 is over, and
a step number counts on from the first pass's steps. A prompt the grammar does not take (a stray ``|``, a lone
trailing backslash) is read literally, as A1111 does.

``AND`` splits a prompt into subprompts whose guidance is summed (A1111's composable prompts), each weighted by
a trailing ``:weight``: ``a castle AND a dragon:0.6``. Each subprompt may hold edits of its own.
"""

import re
from dataclasses import dataclass
from typing import List, Optional, Tuple

_NUMBER = re.compile(r'\s*([+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)\s*\]')  # lark's SIGNED_NUMBER, then ']'
_PLAIN = re.compile(r'[^\\\[\]():|]+')
_AND = re.compile(r'\bAND\b')  # A1111's re_AND and re_weight
_WEIGHT = re.compile(r'^((?:\s|.)*?)(?:\s*:\s*([-+]?(?:\d+\.?|\d*\.\d+)))?\s*$')


@dataclass
class Scheduled:
    before: List  # nodes; empty for [to:when]
    after: List
    number: str  # as written: a '.' makes it a fraction of the steps
    source: str


@dataclass
class Alternate:
    options: List[List]
    source: str


class _Refused(Exception):
    """The text is not in A1111's grammar here."""


class _Parser:
    """Recursive descent over A1111's grammar. Nodes are str (text kept as written, brackets and escapes
    included, for the emphasis parser), `Scheduled` and `Alternate`. At the top level a bracket that opens no
    valid group is text, as A1111's grammar allows there; inside a group it makes the group fail."""

    def __init__(self, text: str):
        self.text = text

    def top(self) -> List:
        text, nodes, i = self.text, [], 0
        while i < len(text):
            char = text[i]
            if char in '([':
                try:
                    group, i = self.group(i)
                    nodes.extend(group)
                except _Refused:
                    nodes.append(char)
                    i += 1
            elif char in ')]:':
                nodes.append(char)
                i += 1
            elif char == '|':  # not one of the stray tokens A1111's grammar takes at the top level
                raise _Refused
            else:
                node, i = self.plain(i)
                nodes.append(node)
        return nodes

    def plain(self, i: int) -> Tuple[str, int]:
        if self.text[i] == '\\':
            if i + 1 == len(self.text):
                raise _Refused
            return self.text[i:i + 2], i + 2
        match = _PLAIN.match(self.text, i)
        return match.group(0), match.end()

    def prompt(self, i: int) -> Tuple[List, int]:
        nodes = []
        while i < len(self.text) and self.text[i] not in ')]:|':
            if self.text[i] in '([':
                group, i = self.group(i)
                nodes.extend(group)
            else:
                node, i = self.plain(i)
                nodes.append(node)
        return nodes, i

    def expect(self, i: int, chars: str) -> str:
        if i >= len(self.text) or self.text[i] not in chars:
            raise _Refused
        return self.text[i]

    def group(self, start: int) -> Tuple[List, int]:
        opener = self.text[start]
        first, i = self.prompt(start + 1)
        if opener == '(':  # emphasis: (text) or (text:weight), kept as written
            if self.expect(i, '):') == ')':
                return ['(', *first, ')'], i + 1
            second, i = self.prompt(i + 1)
            self.expect(i, ')')
            return ['(', *first, ':', *second, ')'], i + 1
        char = self.expect(i, ']|:')
        if char == ']':
            return ['[', *first, ']'], i + 1
        if char == '|':
            options = [first]
            while self.text[i] == '|':
                option, i = self.prompt(i + 1)
                options.append(option)
                self.expect(i, '|]')
            return [Alternate(options, self.text[start:i + 1])], i + 1
        number = _NUMBER.match(self.text, i + 1)  # [to:when]
        if number:
            return [Scheduled([], first, number.group(1), self.text[start:number.end()])], number.end()
        second, i = self.prompt(i + 1)  # [from:to:when]
        self.expect(i, ':')
        number = _NUMBER.match(self.text, i + 1)
        if not number:
            raise _Refused
        return [Scheduled(first, second, number.group(1), self.text[start:number.end()])], number.end()


def parse(text: str) -> Optional[List]:
    """``text`` as nodes, or None where A1111's grammar does not take it (it is then read literally)."""
    try:
        return _Parser(text).top()
    except _Refused:
        return None


def first_edit(text: str) -> Optional[str]:
    """The first prompt-editing group of ``text`` as written, or None."""
    def find(nodes):
        for node in nodes:
            if isinstance(node, (Scheduled, Alternate)):
                return node.source
        return None
    return find(parse(text) or [])


def _when(number: str, steps: int, first_pass_steps: Optional[int]) -> int:
    value = float(number)
    if '.' in number:
        value = (value - (0.0 if first_pass_steps is None else 1.0)) * steps
    else:
        value -= first_pass_steps or 0
    return min(steps, int(value))


def schedule(text: str, steps: int, first_pass_steps: Optional[int] = None) -> List[Tuple[int, str]]:
    """A1111's prompt schedule: [(last step, text)], e.g. ('a [b:c:0.5]', 10) → [(5, 'a b'), (10, 'a c')].
    ``first_pass_steps``: this is the hires fix's second pass, after a first pass of that many steps."""
    nodes = parse(text)
    if nodes is None:
        return [(steps, text)]
    keys = {steps}

    def collect(nodes):
        for node in nodes:
            if isinstance(node, Scheduled):
                when = _when(node.number, steps, first_pass_steps)
                if when >= 1:
                    keys.add(when)
                collect(node.before)
                collect(node.after)
            elif isinstance(node, Alternate):
                keys.update(range(1, steps + 1))
                for option in node.options:
                    collect(option)

    def at_step(step, nodes) -> str:
        out = []
        for node in nodes:
            if isinstance(node, Scheduled):
                out.append(at_step(step, node.before if step <= _when(node.number, steps, first_pass_steps)
                                   else node.after))
            elif isinstance(node, Alternate):
                out.append(at_step(step, node.options[(step - 1) % len(node.options)]))
            else:
                out.append(node)
        return ''.join(out)

    collect(nodes)
    return [(step, at_step(step, nodes)) for step in sorted(keys)]


def text_at(prompt_schedule: List[Tuple[int, str]], call: int) -> str:
    """The text of UNet call ``call`` (from 0), picked as A1111's ``reconstruct_cond_batch`` picks it."""
    return next((text for end, text in prompt_schedule if call <= end), prompt_schedule[0][1])


def split_and(text: str) -> Optional[List[Tuple[str, float]]]:
    """A1111's composable prompts: 'a cat AND a dog:0.5' → [('a cat', 1.0), (' a dog', 0.5)]; None without ``AND``.
    (A1111 also reads a trailing ':weight' of a prompt without AND; here that stays words, so 'at 12:30' is no
    guidance weight of 30.)"""
    if not _AND.search(text):
        return None
    parts = []
    for part in _AND.split(text):
        body, weight = _WEIGHT.search(part).groups()
        parts.append((body, 1.0 if weight is None else float(weight)))
    return parts

