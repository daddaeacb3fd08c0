"""``python -m spoolq``: the same command line as the ``spoolq`` script."""

from .cli import main

if __name__ == "__main__":
    main()
