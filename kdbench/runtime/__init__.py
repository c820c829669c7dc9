"""How a run stays audible: op build locks that cannot strand it (``extensions``), a watchdog on every stage
(``watchdog``), and SIGINT and SIGTERM that stop it cleanly and say how to go on (``signals``)."""

import sys


def say(message: str) -> None:
    # stderr, like the progress bars (which print it above themselves): stdout carries the leaderboard
    print(f"kdbench: {message}", file=sys.stderr, flush=True)
