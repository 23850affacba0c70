"""TVM-free building blocks every target and tool shares: the kernel specialisation (spec), the host <->
kernel ABI (abi), aligned buffers, file utilities (atomic writes, locks, hashes), per-target source
hashes and the package manifest."""
