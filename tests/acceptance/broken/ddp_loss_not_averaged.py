"""DDP loss normalised by each rank's own answer-token count instead of the count summed over all ranks."""

TARGET = "ddp_minimal"
REPLACE = [("loss = ce_sum * world / n_tokens", "loss = ce_sum / (targets != IGNORE).sum()")]
EXPECT = "averaged over all ranks' tokens"
