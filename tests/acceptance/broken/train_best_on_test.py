"""The "validation" loader reads the test set, so the epochs are compared, and best.pt chosen, on the test set."""

TARGET = "train_minimal"
REPLACE = [("val_loader = DataLoader(val_set, 1000)", "val_loader = DataLoader(test_set, 1000)")]
EXPECT = "best.pt was chosen on the test set"
