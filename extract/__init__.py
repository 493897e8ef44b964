"""Stage 1: chest X-ray images -> a frozen encoder (torchvision, timm, Hugging Face or
torchxrayvision) -> the HDF5 feature cache."""
