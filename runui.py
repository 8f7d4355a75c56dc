"""Desktop viewer: browse a folder's predictions with live metrics (PyQt5).

    python runui.py --weights logs/<run>/best.pth --image_dir data/digits/test
    python runui.py --weights logs/<run>/best.pth --image_dir photos --save_dir results --lang zh

The window lives in ui_classification/ (see README "Desktop viewer").
"""

import sys

from ui_classification.app import main
from utils.cli import run_cli

if __name__ == "__main__":
    run_cli(lambda: sys.exit(main()))
