"""Kernel code shared by every target. `common/` holds the target-independent math as TIR expression
builders (no loops, no memory scopes): dtype rounding, softmax exp, band/mask rules, pse, dropout and the
score of one cell, plus the batch-metadata prologue every kernel starts with. Target-specific loop
nests (micro-kernels, packing, thread mapping) live with each target in fag_tvm/targets/<name>/."""
