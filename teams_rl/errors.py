"""Error types that end a run with one clear line instead of a traceback."""


class TeamsRLError(Exception):
    """A user-facing error: bad config, malformed input, missing key. Printed as one line, exit code 2."""

    exit_code = 2


class BudgetExceeded(TeamsRLError):
    """A role's query or USD budget ran out. Finished work is kept; a rerun with a larger budget resumes."""

    exit_code = 3
