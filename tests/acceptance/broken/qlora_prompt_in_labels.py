"""Labels are a copy of input_ids: the prompt tokens are trained too."""

TARGET = "qlora_minimal"
REPLACE = [('"labels": [IGNORE] * len(prompt) + answer', '"labels": prompt + answer')]
EXPECT = "prompt tokens are left in the labels"
