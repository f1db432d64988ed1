"""The chat prompts whose replies assets/demo/TRAINING.md records (scripts/train_demo.py) and whose
end-of-sequence rate tests/test_demo_model.py checks on the shipped model."""

CHAT_PROMPTS = [
    "How do you do, Miss Bennet?",
    "What do you think of Mr. Darcy?",
    "Will you dance with me tonight?",
    "Is it not a fine morning for a walk?",
    "My dear, have you heard that Netherfield Park is let at last?",
    "I cannot agree with you, sir.",
    "Tell me about your sister.",
    "Do you like to read novels?",
]
