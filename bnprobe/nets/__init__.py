"""Models by name (timm's layout): the registry (bnprobe.nets.registry), the families that register in it, Frankle's
init, BN placement, which tensors train, and conv+BN folding. Importing the package registers every family."""

from bnprobe.nets import bottleneck_resnet, cifar_resnet, vgg  # noqa: F401 - each registers its models
