"""The manual page spoolq(1), made from the command line's own help.

    python -m spoolq._manpage > spoolq/data/spoolq.1

Each command's text is what ``spoolq COMMAND --help`` prints: the same
docstrings, and the same option and argument rows, written by the same
``format_options``/``format_epilog`` code into a formatter that writes roff
instead of text. So the page cannot drift from the help;
tests/test_manpage.py regenerates it and compares it with the shipped file.
"""

from __future__ import annotations

import contextlib
import inspect
import sys
from collections.abc import Iterator
from typing import Any

from . import cli
from ._version import __version__

EXIT_STATUSES = [
    (0, "Success. wait: the task FINISHED."),
    (cli.EX_FAILED, "Any error not listed below. wait: the task FAILED. fsck: problems found, or left after --repair."),
    (cli.EX_USAGE, "Usage error (an unknown option, a missing argument). wait: any other error "
                   "(unknown task, deleted while waiting, no spool)."),
    (cli.EX_TEMPFAIL, "enqueue: the queue is full (EX_TEMPFAIL); nothing was written, retry later."),
    (cli.EX_CONFIG, "worker: cannot start (EX_CONFIG): bad server id, missing or unsafe spool, "
                    "server already running."),
    (cli.EX_TIMEOUT, "wait --timeout ran out."),
    (cli.EX_INTERRUPTED, "Interrupted (Ctrl-C)."),
]


def escape(text: str) -> str:
    """Text as roff shows it literally: backslashes and minus signs escaped,
    a leading dot or quote made harmless."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\\&" + text if text.startswith((".", "'")) else text


def term(text: str) -> str:
    """An option or argument name: options in bold, their values in italics."""
    words = []
    for word in text.split():
        bare = word.rstrip(",")
        style = "B" if bare.startswith("-") or bare == "/" else "I"
        words.append(f"\\f{style}{escape(bare)}\\fR" + ("," if word.endswith(",") else ""))
    return " ".join(words)


def paragraphs(text: str | None) -> list[str]:
    """A docstring as paragraphs, each one line (roff fills it)."""
    return [" ".join(p.split()) for p in inspect.cleandoc(text or "").split("\n\n") if p.strip()]


class RoffFormatter:
    """What click's HelpFormatter offers the help code (``section``,
    ``write_dl``, ``write``, ``current_indent``, ``width``), writing roff.
    *headings*: "SH" makes each section a man page section, "B" a bold
    heading inside a command's subsection."""

    width = 10_000  # nothing is shortened for the page
    current_indent = 0

    def __init__(self, headings: str) -> None:
        self.headings = headings
        self.lines: list[str] = []
        self._literal: list[str] = []

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        self.lines += [f".SH {name.upper()}"] if self.headings == "SH" else [".PP", f"\\fB{escape(name)}:\\fR"]
        yield
        if self._literal:
            self.lines += [".PP", ".RS 4", ".nf", *map(escape, self._literal), ".fi", ".RE"]
            self._literal = []

    def write_dl(self, rows: list[tuple[str, str]], *args: Any, **kwargs: Any) -> None:
        for name, text in rows:
            self.lines += [".TP", term(name), escape(" ".join(text.split()))]

    def write(self, text: str) -> None:
        self._literal += [line.strip() for line in text.splitlines() if line.strip()]


def render() -> str:
    import typer
    import typer.main

    group = typer.main.get_command(cli.build_app())
    ctx = group.make_context("spoolq", [], resilient_parsing=True)  # the app's context settings (-h)
    summary, *description = paragraphs(group.help)
    lines = [
        f'.TH SPOOLQ 1 "" "spoolq {__version__}" "User Commands"',
        ".SH NAME",
        f"spoolq \\- {escape(summary[0].lower() + summary[1:].rstrip('.'))}",
        ".SH SYNOPSIS",
        ".B spoolq",
        "[\\fB\\-\\-root\\fR \\fIPATH\\fR] \\fICOMMAND\\fR [\\fIOPTIONS\\fR] [\\fIARGUMENTS\\fR]",
        ".SH DESCRIPTION",
    ]
    for paragraph in description:
        lines += [escape(paragraph), ".PP"]
    lines += [escape("--root is taken before the command or after it. Every error is one line on stderr, "
                     "'spoolq: MESSAGE'.")]
    top = RoffFormatter("SH")
    group.format_options(ctx, top)
    lines += top.lines
    for name in group.list_commands(ctx):
        command = group.get_command(ctx, name)
        sub = command.make_context(name, [], parent=ctx, resilient_parsing=True)
        pieces = " ".join(command.collect_usage_pieces(sub))
        lines += [f'.SS "spoolq {name} {escape(pieces)}"']
        for i, paragraph in enumerate(paragraphs(command.help)):
            lines += ([".PP"] if i else []) + [escape(paragraph)]
        body = RoffFormatter("B")
        command.format_options(sub, body)
        command.format_epilog(sub, body)
        lines += body.lines
    lines += [".SH ENVIRONMENT", ".TP", ".B SPOOLQ_ROOT",
              escape("The spool directory when --root is not given (default /var/spool/spoolq); set but empty, "
                     "it is refused (exit 2), as an empty --root is. "
                     "spoolq sets it for its own process and the handlers it runs.")]
    lines += [".SH EXIT STATUS"]
    for code, text in EXIT_STATUSES:
        lines += [".TP", f".B {code}", escape(text)]
    lines += [".SH FILES", ".TP", ".I /var/spool/spoolq",
              escape("The default spool: spool.json (settings), types/ (one file per task type), "
                     "enqueued/, scheduled/SERVER/, running/, done/ (one directory per task), tmp/, "
                     "quarantine/, locks/."),
              ".SH SEE ALSO",
              "\\fBsystemctl\\fR(1), \\fBsystemd.service\\fR(5); README.md and docs/contract.md in the sources."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
