"""msdseg: multiscale 3D diffusion segmentation of T1-weighted brain MRI (Qt-free, Slicer-free core)."""
__version__ = "0.1.0"
