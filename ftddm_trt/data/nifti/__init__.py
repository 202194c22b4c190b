"""NIfTI files in the FSL-MRS (``fsl_mrsi``) layout."""
