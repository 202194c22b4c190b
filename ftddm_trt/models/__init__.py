"""ftddm_trt.models"""
