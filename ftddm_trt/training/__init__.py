"""ftddm_trt.training"""
