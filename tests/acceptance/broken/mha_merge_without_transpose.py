"""Heads merged by a plain reshape (B, H, L, D) -> (B, L, E), without transposing back to (B, L, H, D) first."""
TARGET = "mha_minimal"
REPLACE = [("y = y.transpose(1, 2).reshape(B, L, E)", "y = y.reshape(B, L, E)")]
EXPECT = "heads merged without the transpose"
