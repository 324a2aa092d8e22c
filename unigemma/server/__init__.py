"""The OpenAI-compatible HTTP server and browser chat page (`unigemma serve`)."""

from .app import ServerConfig, create_app

__all__ = ["ServerConfig", "create_app"]
