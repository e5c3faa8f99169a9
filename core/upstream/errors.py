"""The one error type the upstream tools raise for expected failures.

Every expected failure (unknown name, no git, a mirror without the pinned commit, a patch that does
not apply, local edits in the way) is an `UpstreamError` whose message is one line that names the
fix. The CLI prints it and exits with `code`; it never shows a traceback for these.
"""
from __future__ import annotations

# Exit codes of the CLI.
EXIT_FAILED = 1      # the operation was refused or failed (patch does not apply, local edits, ...)
EXIT_USAGE = 2       # unknown upstream, bad option value, bad manifest
EXIT_ENVIRONMENT = 3  # git or GitPython missing, source unreachable
EXIT_INTERRUPTED = 130  # Ctrl-C (after the clone was put back)


class UpstreamError(Exception):
    """An expected failure: `str(err)` is a one-line message that says what to do."""

    def __init__(self, message: str, code: int = EXIT_FAILED):
        super().__init__(" ".join(message.split()))  # always one line
        self.code = code
