"""mixchat: chat with Mistral and Mixtral release folders using mixchat's own model code."""

__version__ = "0.8.2"
