"""ftddm_trt.engine"""
