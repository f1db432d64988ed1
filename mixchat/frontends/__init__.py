"""Front ends: the command line, the one-shot stdin/stdout command, line mode and the Textual app."""
