"""The evaluation loop never calls model.eval(): BatchNorm normalises with each evaluation batch's own statistics."""

TARGET = "train_minimal"
REPLACE = [("    model.eval()  # BatchNorm: use the running averages, so a prediction does not depend on the rest of "
            "the batch\n", "")]
EXPECT = "call model.eval() before evaluating"
