"""DDP without sampler.set_epoch(epoch): DistributedSampler shuffles every epoch with epoch 0's seed."""

TARGET = "ddp_minimal"
REPLACE = [("        sampler.set_epoch(epoch)  # DDP:", "        pass  # DDP:")]
EXPECT = "every epoch reads the same order: call sampler.set_epoch(epoch)"
