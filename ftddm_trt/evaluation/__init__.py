"""ftddm_trt.evaluation: how well the samplers and the shipped model do, as the commands and training measure it.

- ``volumes``: NRMSE / PSNR / SSIM of volumes and map stacks against the truth (``ftddm-trt evaluate``);
- ``quality``: quality versus NFE on the phantom test split (``ftddm-trt bench``);
- ``paper_table``: the paper's Table 1 and Figs. 5-7 from a quality record (mean ± sd, Wilcoxon p, speed-ups);
- ``generalization``: PSNR gain per phantom style and qc convention (fine-tuning scores its candidates with it);
- ``fine_mask``: the learned fine mask's threshold and qc step weight, chosen on validation maps;
- ``robustness``: the shipped model on fresh subjects of each phantom family;
- ``report``: JSON and markdown helpers (portable paths, tables).

The timing harness of the runtime benchmarks (per-NFE cost, latency) lives with the scripts, in
``benchmarks/harness``; nothing in the package imports it.
"""
