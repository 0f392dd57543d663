"""Sub-commands of the ``xmodal`` console script, one module each.

``serve`` (the API), ``worker`` (a Redis-mode ingestion worker), ``train``, ``eval``,
``querybank`` (build or inspect the QB-Norm bank) and ``export`` (a checkpoint to ship). Each
module exposes ``main(argv) -> int``; ``service/cli.py`` dispatches ``xmodal <name> ...`` to
``service.commands.<name>.main`` for every name in its ``COMMANDS`` table.
"""
