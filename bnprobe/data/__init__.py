"""Data: the official files (sources) and the images held on the device with batched augmentation (device)."""
