"""ftddm_trt.data"""
