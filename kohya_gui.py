"""Start the training studio's browser GUI: `python kohya_gui.py --help` lists the flags."""
from kohya_gui.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
