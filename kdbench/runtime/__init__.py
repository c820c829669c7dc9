"""How a run stays audible: op build locks that cannot strand it (``extensions``) and a watchdog on every stage
(``watchdog``)."""

import sys


def say(message: str) -> None:
    # stderr, like the progress bars (which print it above themselves): stdout carries the leaderboard
    print(f"kdbench: {message}", file=sys.stderr, flush=True)
