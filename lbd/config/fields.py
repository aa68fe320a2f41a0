"""A small typed reader over raw YAML values that records problems with their paths.

Each config section declares the keys it knows; anything else is reported with a did-you-mean.
Parsers are plain functions ``(value) -> T`` that raise ``FieldError``; the reader attaches the
path, so a parser never needs to know where its value came from.
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import reprlib
from collections.abc import Callable, Collection, Mapping
from typing import Any, TypeVar

from lbd.config.errors import FieldError, Problem

T = TypeVar("T")
Parser = Callable[[object], T]

_MISSING: Any = object()
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_PORT_NAME = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")


# Bounds on what a config's problems may cost, however hostile the file: a value in a message is
# shown at most this long (reprlib never walks more of a structure than it prints), a message
# is cut at MAX_MESSAGE, and past MAX_PROBLEMS the rest are only counted.
MAX_MESSAGE = 300
MAX_PROBLEMS = 200
_SHOW = reprlib.Repr()
_SHOW.maxstring = _SHOW.maxother = 60
_SHOW.maxlist = _SHOW.maxtuple = _SHOW.maxdict = _SHOW.maxset = 4
_SHOW.maxlevel = 3
_SHOW.maxlong = 40


def show(value: object) -> str:
    """A value from the file as a message may show it: ``repr``, bounded in length and depth."""
    try:
        return _SHOW.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


class Problems:
    """Collects problems; one per config load, shared by every reader."""

    def __init__(self) -> None:
        self.items: list[Problem] = []
        self.dropped = 0  # past MAX_PROBLEMS: counted, not kept

    def add(self, path: str, message: str) -> None:
        if len(self.items) >= MAX_PROBLEMS:
            self.dropped += 1
            return
        if len(message) > MAX_MESSAGE:
            message = message[: MAX_MESSAGE - 3] + "..."
        self.items.append(Problem(path[:MAX_MESSAGE], message))

    @property
    def count(self) -> int:
        """Every problem added, kept or not: compare before and after to see if a reader
        found any."""
        return len(self.items) + self.dropped

    def all(self) -> list[Problem]:
        """The problems kept, and one line for those past MAX_PROBLEMS."""
        if not self.dropped:
            return self.items
        return [*self.items, Problem("", f"... and {self.dropped} more problems")]


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def type_name(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


class Section:
    """The keys of one YAML mapping, read once each; unknown keys are problems."""

    def __init__(
        self, raw: object, path: str, problems: Problems, known: Collection[str] | None
    ) -> None:
        """``known=None`` accepts any string key (a free-form mapping such as endpoint ports)."""
        self.path = path
        self.problems = problems
        self.values: Mapping[object, object] = {}
        if isinstance(raw, Mapping):
            self.values = raw
        elif raw is not None:
            problems.add(path, f"expected a mapping, got {type_name(raw)}")
        for key in self.values:
            if not isinstance(key, str):
                problems.add(path, f"keys must be strings, got {show(key)}")
            elif known is not None and key not in known:
                hint = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                known_list = ", ".join(sorted(known))
                problems.add(join(path, key), f"unknown key{suffix}; known keys: {known_list}")

    def has(self, key: str) -> bool:
        return key in self.values

    def raw(self, key: str) -> object:
        return self.values.get(key)

    def get(self, key: str, parse: Parser[T], default: T = _MISSING) -> T:
        """The parsed value; on a problem it is recorded and ``default`` returned.

        A key without a default is required.
        """
        if key not in self.values or self.values[key] is None:
            if default is _MISSING:
                self.problems.add(join(self.path, key), "required")
                return _MISSING
            return default
        try:
            return parse(self.values[key])
        except FieldError as error:
            self.problems.add(join(self.path, key), str(error))
        except (ValueError, TypeError, OverflowError) as error:  # a parser's own limits
            self.problems.add(join(self.path, key), f"invalid value: {error}")
        return default

    def items(self, key: str) -> list[tuple[str, object]]:
        """(path, raw item) for each element of a list value; a non-list is a problem."""
        value = self.values.get(key)
        if value is None:
            return []
        path = join(self.path, key)
        if not isinstance(value, list):
            self.problems.add(path, f"expected a list, got {type_name(value)}")
            return []
        return [(join(path, i), item) for i, item in enumerate(value)]


def is_missing(value: object) -> bool:
    return value is _MISSING


# -- parsers -------------------------------------------------------------------------------


def string(value: object) -> str:
    if not isinstance(value, str):
        raise FieldError(f"expected a string, got {type_name(value)}")
    return value


def boolean(value: object) -> bool:
    if not isinstance(value, bool):
        raise FieldError(f"expected true or false, got {show(value)}")
    return value


def integer(value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"expected a whole number, got {type_name(value)} {show(value)}")
    return value


def int_between(low: int, high: int) -> Parser[int]:
    def parse(value: object) -> int:
        number = integer(value)
        if not low <= number <= high:
            raise FieldError(f"must be between {low} and {high}, got {number}")
        return number

    return parse


def one_of(choices: Collection[str]) -> Parser[Any]:
    def parse(value: object) -> str:
        text = string(value)
        if text not in choices:
            hint = difflib.get_close_matches(text, list(choices), n=1, cutoff=0.6)
            suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise FieldError(f"must be one of {', '.join(choices)}, got {show(text)}{suffix}")
        return text

    return parse


def dns_label(value: object) -> str:
    text = string(value)
    if len(text) > 63 or not _DNS_LABEL.fullmatch(text):
        raise FieldError(
            "must be a DNS label (lower-case letters, digits and '-', at most 63), "
            f"got {show(text)}"
        )
    return text


def port_name(value: object) -> str:
    text = string(value)
    if len(text) > 15 or not _PORT_NAME.fullmatch(text) or not re.search("[a-z]", text):
        raise FieldError(
            f"must be a port name (lower-case letters, digits and '-', at most 15, "
            f"at least one letter), got {show(text)}"
        )
    return text


def ip_address(value: object) -> str:
    """A normalised IP literal (IPv4 or IPv6)."""
    text = string(value)
    try:
        return str(ipaddress.ip_address(text.strip()))
    except ValueError:
        raise FieldError(f"expected an IP address, got {show(text)}") from None


def unicast_address(value: object) -> str:
    """An address a client can connect to: not the wildcard, not multicast."""
    address = ip_address(value)
    parsed = ipaddress.ip_address(address)
    if parsed.is_unspecified or parsed.is_multicast:
        raise FieldError(f"must be a unicast address, got {address}")
    return address
