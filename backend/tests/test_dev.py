"""dev.py's command line: the README's and CLAUDE.md's commands parse as documented."""

import pytest

from dev import parse_arguments


@pytest.mark.parametrize(
    ("argv", "command", "passed"),
    [
        (["test"], "test", []),
        (["test", "-k", "toggle", "-x"], "test", ["-k", "toggle", "-x"]),
        (["test", "tests/test_list.py", "-q"], "test", ["tests/test_list.py", "-q"]),
        (["bench", "--quick"], "bench", ["--quick"]),
        (
            ["bench", "--json", "out.json", "--scenarios", "list"],
            "bench",
            ["--json", "out.json", "--scenarios", "list"],
        ),
        (["check"], "check", []),
    ],
)
def test_test_and_bench_pass_what_follows_through(
    argv: list[str], command: str, passed: list[str]
) -> None:
    arguments, rest = parse_arguments(argv)
    assert arguments.command == command
    assert rest == passed


def test_other_commands_keep_their_own_options() -> None:
    arguments, rest = parse_arguments(["serve", "--production", "--workers", "4"])
    assert (arguments.command, arguments.production, arguments.workers, rest) == (
        "serve",
        True,
        "4",
        [],
    )
    arguments, rest = parse_arguments(["token", "alice", "--minutes", "5"])
    assert (arguments.user_id, arguments.minutes, rest) == ("alice", "5", [])


def test_unknown_options_of_other_commands_are_refused() -> None:
    with pytest.raises(SystemExit):
        parse_arguments(["serve", "--json", "x"])
