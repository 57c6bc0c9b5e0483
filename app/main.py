"""Sol's desktop window (minimal until the GUI issue lands)."""
from __future__ import annotations

import sys


def run(args) -> int:
    from PySide6.QtCore import QTimer
    from PySide6.QtWidgets import QApplication, QLabel, QMainWindow

    app = QApplication.instance() or QApplication(sys.argv[:1])
    win = QMainWindow()
    win.setWindowTitle("Sol")
    win.setCentralWidget(QLabel("Sol: a desktop lab for small language models"))
    win.resize(1100, 720)
    win.show()
    if getattr(args, "screenshot", None):
        def shoot():
            win.grab().save(args.screenshot)
            app.quit()
        QTimer.singleShot(300, shoot)
    return app.exec()
