"""What the commands do, apart from the command line: each module runs one job end to end (read, decide,
compute, write) and raises an exception that names why it cannot; ``ftddm_trt.cli`` parses the options,
calls these functions and turns their exceptions into error messages. Workflows never import the CLI.

- ``upscale``: one subject folder -> 64 x 64 maps (``UpscaleOptions``, ``upscale_to_folder``)
- ``cohort``: every subject of a cohort over one backend, resumable (``run_cohort``)
- ``evaluate``: a prediction folder against its truth (``evaluate_folders``)
- ``demo``: a phantom subject made, super-resolved and scored (``run_demo``)
- ``phantom``: phantom datasets (``write_phantoms``)
- ``train``: training, fine-tuning, fine-mask estimators across processes (``run_training``, ...)
- ``deploy``: Triton model repositories and the server (``make_triton_repo``, ``serve_repository``)
- ``bench``: quality versus NFE (``run_quality_bench``)
"""
