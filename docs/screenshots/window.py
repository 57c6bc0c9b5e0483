"""What the screenshot scripts that drive the window share (`sol gui --screenshot` cannot type or click):
Sol's main window at the pictures' size, shown, and `spin`, which runs its events for a while."""
import time

from PySide6.QtWidgets import QApplication

from sol.app.main import build_window

win, ctx = build_window()
win.resize(1400, 860)
win.show()
app = QApplication.instance()


def spin(seconds, until=lambda: False):
    """Run the window's events for `seconds`, or until `until()` holds."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < seconds and not until():
        app.processEvents()
        time.sleep(0.01)
