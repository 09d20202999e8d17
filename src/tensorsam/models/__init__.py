"""Ready architectures built from :mod:`tensorsam.nn`."""

from .resnet import CifarResNet, conv_shape, parameter_report, resnet

__all__ = ["CifarResNet", "conv_shape", "parameter_report", "resnet"]
