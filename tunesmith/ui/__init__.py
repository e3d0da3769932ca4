"""The web UI at /ui: watch runs train (state, live loss curves, eval and export numbers) and chat with models.

Plain server-rendered HTML with a little JavaScript from static/, served by the API server itself.
"""

from tunesmith.ui.routes import install_ui

__all__ = ["install_ui"]
