"""Sub-commands of the ``xmodal`` console script that wrap training and evaluation.

Each module exposes ``main(argv: list[str] | None = None) -> int``; ``service/cli.py``
dispatches ``xmodal train ...`` and ``xmodal eval ...`` to them.
"""
