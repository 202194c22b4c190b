"""ftddm_trt.cli"""
