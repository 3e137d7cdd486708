"""Every verb of the ``scbert`` CLI answers ``-h`` and ``--help`` with its own help, exit 0."""

from __future__ import annotations

import signal
import warnings
from collections.abc import Iterator

import pytest

from scbert_platform import cli

VERBS = list(cli.subcommands(cli.build_parser()))


@pytest.fixture(autouse=True)
def restored() -> Iterator[None]:
    """``main`` installs a Ctrl-C handler and a warning format for the process: undo both."""
    handler, format_warning = signal.getsignal(signal.SIGINT), warnings.formatwarning
    yield
    signal.signal(signal.SIGINT, handler)
    warnings.formatwarning = format_warning


def test_the_table_is_read() -> None:
    assert {"ingest", "finetune", "gene-embed", "synth"} <= set(VERBS)


@pytest.mark.parametrize("flag", ["-h", "--help"])
@pytest.mark.parametrize("verb", VERBS)
def test_help_of_every_verb(verb: str, flag: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main([verb, flag])
    out = capsys.readouterr().out
    assert exit_.value.code == 0, out
    assert "usage" in out
    assert not out.startswith("usage: scbert [-h]"), "the top level's help, not the verb's"
    if verb not in cli.PASS_THROUGH:  # those print their module's usage line
        assert out.startswith(f"usage: scbert {verb} ")


def test_pass_through_verbs_keep_the_top_level_verbose_flag() -> None:
    args = cli.parse_args(["--verbose", "synth", "--cells", "10", "-v"])
    assert (args.verb, args.verbose, args.rest) == ("synth", True, ["--cells", "10", "-v"])
