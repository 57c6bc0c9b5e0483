from PySide6.QtWidgets import QLabel
class ChatPanel(QLabel):
    def __init__(self, ctx):
        super().__init__("chat coming")
