"""``python -m quality classifier``."""

from quality.cli import main

if __name__ == "__main__":
    main(prog_name="python -m quality")
