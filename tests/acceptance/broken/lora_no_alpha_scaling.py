"""LoRA forward adds B A x without the alpha / r scaling."""

TARGET = "lora_minimal"
REPLACE = [("return self.base(x) + self.scaling * update", "return self.base(x) + update")]
EXPECT = "missing the alpha/r scaling"
