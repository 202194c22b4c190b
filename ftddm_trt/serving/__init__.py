"""ftddm_trt.serving"""
