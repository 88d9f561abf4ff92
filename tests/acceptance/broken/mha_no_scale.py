"""Attention scores Q Kᵀ left unscaled: the 1/sqrt(head_dim) factor forgotten."""
TARGET = "mha_minimal"
REPLACE = [("att = att / D**0.5  #", "att = att  #")]
EXPECT = "not scaled by 1/sqrt(head_dim)"
