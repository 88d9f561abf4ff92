"""Labels are a copy of input_ids: the prompt tokens are trained too."""

TARGET = "qlora_minimal"
REPLACE = [('"labels": [IGNORE] * len(prompt) + ids[len(prompt):end]', '"labels": ids[:end]')]
EXPECT = "prompt tokens are left in the labels"
