"""Small user-factory models for tests, with FLOP counts that give exact binary timestamps."""

from torch import nn


class Tiny(nn.Module):
    """60 -> 4 -> 4 -> 10: forward FLOPs per sample 480, 32, 80; backward 480 (no input grad), 64, 160."""

    def __init__(self, input_shape, num_classes):
        super().__init__()
        self.fc1 = nn.Linear(input_shape[0], 4)
        self.fc2 = nn.Linear(4, 4)
        self.fc3 = nn.Linear(4, num_classes)

    def forward(self, x):
        return self.fc3(self.fc2(self.fc1(x).relu()).relu())


def tiny(input_shape, num_classes):
    return Tiny(input_shape, num_classes)


class AlwaysNaN(Tiny):
    """`Tiny` whose every output is NaN: a broken model, whatever the data."""

    def forward(self, x):
        return super().forward(x) * float("nan")


def always_nan(input_shape, num_classes):
    return AlwaysNaN(input_shape, num_classes)


class Loud(Tiny):
    """`Tiny` with logits scaled by 1e20: finite losses and gradients of about 1e19, so that a learning rate of
    1e20 overflows the float32 weights in one step."""

    def forward(self, x):
        return super().forward(x) * 1e20


def loud(input_shape, num_classes):
    return Loud(input_shape, num_classes)
