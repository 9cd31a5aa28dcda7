"""Training and labelled data: dataset loaders, calibration, quantization-aware training,
the dense baseline and evaluation."""
