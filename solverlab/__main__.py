"""``python -m solverlab``: the ``solverlab`` command."""

from .cli import main

if __name__ == "__main__":
    main()
