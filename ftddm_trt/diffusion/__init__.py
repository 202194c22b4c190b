"""ftddm_trt.diffusion"""
