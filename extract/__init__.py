"""Stage 1: NIH ChestX-ray14 images -> frozen ResNet50 -> the HDF5 feature cache."""
