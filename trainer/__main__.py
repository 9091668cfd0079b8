"""``python -m trainer fit`` / ``python -m trainer info``."""

from trainer.cli import main

if __name__ == "__main__":
    main(prog_name="python -m trainer")
