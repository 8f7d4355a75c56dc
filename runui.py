"""Desktop viewer: browse a folder's predictions with live metrics (PyQt5).

    python runui.py --weights logs/<run>/best.pth --image_dir data/digits/test
    python runui.py --weights logs/<run>/best.pth --image_dir photos --save_dir results --lang zh

The window lives in ui_classification/ (see README "Desktop viewer").
"""

import sys

from ui_classification.app import main
from utils.cli import run_cli
from utils.memory import keep_freed_memory, let_waiting_threads_sleep

if __name__ == "__main__":
    keep_freed_memory()  # glibc keeps the memory a batch frees for the next one (utils/memory.py)
    let_waiting_threads_sleep()  # the window's thread and the classification share every core
    run_cli(lambda: sys.exit(main()))
