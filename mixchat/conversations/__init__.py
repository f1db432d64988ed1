"""Conversations: a chat turn, the SQLite store and its migrations, saved KV caches, import/export."""
