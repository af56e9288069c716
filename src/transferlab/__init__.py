"""transferlab: take ImageNet-pretrained backbones to a new image dataset and measure, honestly,
what each way of adapting them buys."""

__version__ = "0.1.0"
