"""Development tools: training over the model's own modules, and synthetic release folders."""
