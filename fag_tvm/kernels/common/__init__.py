"""Target-independent TIR math of the fag kernels (SPEC §2/§3), shared by LLVM, CUDA and Ascend-like.

Conventions (ABI.md, TVM_NOTES.md): expressions only — callers place them in their own loop nests;
never bind a Python name inside a `T.vectorized` loop (TVM 0.27 keeps only the last lane of a let), so
everything here returns expression trees; fp32 compute, narrow storage (bf16 as raw uint16 bits)."""
