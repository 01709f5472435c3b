"""The ``/flag`` grammar, the same in every chat; pure (no I/O), so it is tested on its own.

/flag list [PATTERN]              flags whose key matches (a glob with * ? [..], else a substring)
/flag get KEY                     one flag: source, state, variants and weights, override
/flag on KEY | /flag off KEY      a native flag's "enabled"
/flag kill KEY | restore KEY      everyone gets the default / undo a kill or promotion
/flag set KEY VARIANT PERCENT     that variant gets PERCENT % of the weight, the others scaled
/flag promote KEY VARIANT         everyone gets that variant
/flag stats KEY [GOAL]            the experiment's results tables
/flag help
"""

from __future__ import annotations

import re
from dataclasses import dataclass

COMMAND = "/flag"
CHANGES = frozenset({"on", "off", "kill", "restore", "set", "promote"})
# name → (required arguments, optional arguments)
ARITY = {
    "list": ((), ("PATTERN",)),
    "get": (("KEY",), ()),
    "on": (("KEY",), ()),
    "off": (("KEY",), ()),
    "kill": (("KEY",), ()),
    "restore": (("KEY",), ()),
    "set": (("KEY", "VARIANT", "PERCENT"), ()),
    "promote": (("KEY", "VARIANT"), ()),
    "stats": (("KEY",), ("GOAL",)),
    "help": ((), ()),
}
HELP = """\
/flag list [PATTERN]           flags (PATTERN: a glob like checkout-*, or part of a key)
/flag get KEY                  one flag: state, variants, weights, override
/flag on KEY | off KEY         switch a flag on or off (flagproxy's own flags)
/flag kill KEY                 everyone gets the default, until restored
/flag restore KEY              undo a kill or a promotion
/flag set KEY VARIANT PERCENT  give VARIANT PERCENT % of the traffic; the others keep their ratios
/flag promote KEY VARIANT      everyone gets VARIANT (ends the experiment)
/flag stats KEY [GOAL]         the experiment's results
/flag help                     this text"""
MAX_TEXT = 1000  # characters of command text considered; a longer text is refused as usage
_PERCENT = re.compile(r"([0-9]{1,3})%?")


class Usage(ValueError):
    """A malformed command: the message says what is wrong; the reply adds the help text."""


@dataclass(frozen=True)
class Command:
    name: str
    key: str = ""
    variant: str = ""
    percent: int = 0
    pattern: str = ""
    goal: str = ""

    @property
    def changes(self) -> bool:
        return self.name in CHANGES


def command_text(text: str, bot_username: str = "") -> str | None:
    """The arguments of a ``/flag`` message (``/flag …`` or ``/flag@bot …``), or None when the
    message is not a ``/flag`` command for this bot (another command, another bot, plain text).
    With ``bot_username`` empty any ``@suffix`` is taken as ours."""
    parts = text.split(maxsplit=1)
    if not parts:
        return None
    name, at, bot = parts[0].partition("@")
    if name.lower() != COMMAND:
        return None
    if at and bot_username and bot.lower() != bot_username.lstrip("@").lower():
        return None
    return parts[1] if len(parts) > 1 else ""


def parse(text: str) -> Command:
    """``"set KEY VARIANT 25"`` (Slack's text; a leading ``/flag`` is allowed) → a Command, or Usage."""
    if len(text) > MAX_TEXT:
        raise Usage(f"the command is longer than {MAX_TEXT} characters")
    words = text.split()
    if words and words[0].lower().partition("@")[0] == COMMAND:
        words = words[1:]
    if not words:
        raise Usage("no command given")
    name, args = words[0].lower(), words[1:]
    if name not in ARITY:
        raise Usage(f"unknown command {words[0]!r}")
    required, optional = ARITY[name]
    if not len(required) <= len(args) <= len(required) + len(optional):
        shape = " ".join([name, *required, *(f"[{o}]" for o in optional)])
        raise Usage(f"usage: /flag {shape}")
    named = dict(zip((*required, *optional), args, strict=False))
    percent = 0
    if "PERCENT" in named:
        match = _PERCENT.fullmatch(named["PERCENT"])
        if match is None or int(match.group(1)) > 100:
            raise Usage(f"PERCENT must be a whole number 0..100, got {named['PERCENT']!r}")
        percent = int(match.group(1))
    return Command(
        name=name,
        key=named.get("KEY", ""),
        variant=named.get("VARIANT", ""),
        percent=percent,
        pattern=named.get("PATTERN", ""),
        goal=named.get("GOAL", ""),
    )


def reweighted(weights: list[tuple[str, int]], variant: str, percent: int) -> list[tuple[str, int]]:
    """The weights with ``variant`` at ``percent`` % of their total and the others sharing the rest
    in their present ratios (equally when they are all 0): integers, in the same order, summing to
    the same total when it is a multiple of 100, else to the next one (so every whole percent is
    exact: 1/1 becomes 25/75, not 1/1). The largest remainders get the leftover units, ties in
    declared order. ValueError when the variant is unknown or nothing can take the rest."""
    names = [name for name, _ in weights]
    if variant not in names:
        raise ValueError(f"no variant {variant!r}; the variants are {', '.join(names)}")
    total = -(-sum(w for _, w in weights) // 100) * 100 or 100
    target = (total * percent + 50) // 100  # round half up
    rest = total - target
    others = [(name, w) for name, w in weights if name != variant]
    if not others:
        if percent != 100:
            raise ValueError(f"{variant!r} is the only variant: it always has 100 %")
        return list(weights)
    shares = [w for _, w in others] if any(w for _, w in others) else [1] * len(others)
    base = sum(shares)
    floors = [rest * s // base for s in shares]
    left = rest - sum(floors)
    by_remainder = sorted(range(len(others)), key=lambda i: (-(rest * shares[i] % base), i))
    for i in by_remainder[:left]:
        floors[i] += 1
    new = dict(zip((name for name, _ in others), floors, strict=True))
    new[variant] = target
    return [(name, new[name]) for name in names]
