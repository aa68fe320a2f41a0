"""Hostile config files: only problems come out of the loader, each quickly and briefly.

Found by black-box testing: a 400-digit duration raised OverflowError (a traceback in
``lbd check``, a silently dead reload task in ``lbd run``), a 4,300-digit one ValueError, and a
few hundred bytes of nested YAML aliases took seconds and tens of MB of messages.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lbd.cli import main
from lbd.config import ConfigError, load_text
from lbd.config.fields import MAX_MESSAGE, MAX_PROBLEMS

VALID = """\
apiVersion: lbd/v1
node: {addresses: [127.0.0.5]}
defaults: {strategy: round-robin, connectTimeout: 1s}
services:
  - name: web
    type: NodePort
    clusterIP: 127.96.0.10
    ports: [{name: http, port: 80, targetPort: http, nodePort: 30080}]
    endpoints:
      - {address: 127.0.1.1, ports: {http: 8080}, weight: 2}
      - {address: 127.0.1.2, ports: {http: 8081}}
"""
TIME_BOUND_S = 2.0


def alias_bomb(levels: int, where: str = "accessLog") -> str:
    """Nested aliases: ``levels`` of 9 references each stand for 9**levels strings."""
    anchors = []
    for i in range(levels):
        body = "[x,x,x,x,x,x,x,x,x]" if i == 0 else "[" + ",".join([f"*a{i - 1}"] * 9) + "]"
        anchors.append(f"k{i}: &a{i} {body}")
    return (
        "apiVersion: lbd/v1\nservices:\n  - name: s\n    clusterIP: 127.0.0.1\n"
        "    ports: [{port: 1}]\n    labels: {" + ", ".join(anchors) + "}\n"
        f"    {where}: *a{levels - 1}\n"
    )


def outcome(text: str | bytes) -> list[str]:
    """The problems of loading ``text`` (none for a good config); fails on anything else, or
    on a load that takes too long or says too much."""
    began = time.monotonic()
    try:
        load_text(text, "<fuzz>")
        problems: list[str] = []
    except ConfigError as error:
        problems = [str(p) for p in error.problems]
    assert time.monotonic() - began < TIME_BOUND_S
    assert len(problems) <= MAX_PROBLEMS + 1
    assert all(len(p) <= 2 * MAX_MESSAGE for p in problems)
    return problems


@pytest.mark.parametrize("digits", [400, 4400, 100_000])
def test_a_huge_number_is_a_problem_not_a_traceback(digits: int) -> None:
    text = VALID.replace("connectTimeout: 1s", f"connectTimeout: {'9' * digits}")
    [problem] = outcome(text)
    assert "a number of" in problem and "characters" in problem


def test_a_large_duration_is_bounded_before_any_timer_sees_it() -> None:
    [problem] = outcome(VALID.replace("connectTimeout: 1s", "connectTimeout: 99999999999s"))
    assert problem.startswith("defaults.connectTimeout: at most 315360000 seconds")


def test_an_alias_bomb_is_refused_at_once() -> None:
    for levels in (7, 9):
        [problem] = outcome(alias_bomb(levels))
        assert "aliases expand to more than" in problem


def test_a_few_aliases_are_fine_and_values_in_messages_are_short() -> None:
    problems = outcome(alias_bomb(4))  # 9**4 strings: under the expansion bound
    assert problems and all(len(p) <= MAX_MESSAGE + 40 for p in problems)


def test_a_recursive_alias_is_refused() -> None:
    assert "refers to a node that contains it" in outcome("a: &a [1, *a]\n")[0]


def test_thousands_of_problems_are_capped() -> None:
    endpoints = "".join(f"      - not-an-ip-{n}\n" for n in range(5000))
    text = VALID.split("    endpoints:\n")[0] + "    endpoints:\n" + endpoints
    problems = outcome(text)
    assert len(problems) == MAX_PROBLEMS + 1 and problems[-1].endswith("more problems")


def test_lbd_check_reports_problems_without_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for name, text in (("number", VALID.replace("1s", "9" * 5000)), ("bomb", alias_bomb(9))):
        path = tmp_path / f"{name}.yaml"
        path.write_text(text)
        began = time.monotonic()
        assert main(["check", str(path)]) == 1
        assert time.monotonic() - began < TIME_BOUND_S
        err = capsys.readouterr().err
        assert "Traceback" not in err and len(err) < 2000, err[:300]


# -- fuzzing ----------------------------------------------------------------------------------

_fragments = st.sampled_from(
    [
        "&a [1, 2]",
        "*a",
        "[*a, *a, *a]",
        "{" * 50 + "}" * 50,
        "[" * 2000 + "]" * 2000,
        "9" * 5000,
        "1e999999",
        "-0x7fffffffffffffff",
        "!!python/object:os.system ls",
        "!!binary AAAA",
        "\x00\x01\x02",
        "? [a]\n: b",
        "<<: *a",
        "'" + "x" * 100_000 + "'",
        "null",
        "~",
        "[]",
        "{}",
        "2001-01-01",
        "0o777",
        ".inf",
        "- - - -",
        "%YAML 1.2\n---",
        "\t",
    ]
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    text = VALID.encode()
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "insert", "splice", "truncate"]))
        at = draw(st.integers(0, len(text)))
        if kind == "flip" and text:
            at = min(at, len(text) - 1)
            text = text[:at] + bytes([draw(st.integers(0, 255))]) + text[at + 1 :]
        elif kind == "insert":
            text = text[:at] + draw(st.binary(max_size=40)) + text[at:]
        elif kind == "splice":
            text = text[:at] + draw(_fragments).encode() + text[at:]
        else:
            text = text[:at]
    return text


@settings(
    max_examples=300,
    deadline=TIME_BOUND_S * 1000,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=True,
)
@given(mutated())
def test_mutated_configs_give_problems_only(text: bytes) -> None:
    outcome(text)


@settings(max_examples=100, deadline=TIME_BOUND_S * 1000, derandomize=True)
@given(
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda children: (
            st.lists(children, max_size=4)
            | st.dictionaries(st.text(max_size=12), children, max_size=4)
        ),
        max_leaves=40,
    )
)
def test_any_yaml_value_in_a_service_gives_problems_only(value: object) -> None:
    import yaml

    for key in ("ports", "endpoints", "healthCheck", "maxConnections", "labels", "name"):
        document = yaml.safe_load(VALID)
        document["services"][0][key] = value
        outcome(yaml.safe_dump(document))
