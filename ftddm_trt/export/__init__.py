"""ftddm_trt.export"""
