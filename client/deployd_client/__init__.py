"""Client side of deployd: the protocol client and the ``deployd`` command.

Imports only the standard library, so every subcommand but ``serve`` starts
about as fast as the interpreter itself.
"""

__version__ = "0.1.0"
