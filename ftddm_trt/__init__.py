"""ftddm-trt: deployment engine for FTDDM MRSI super-resolution (Dong et al., MedIA 2024)."""

__version__ = "0.2.0"
