"""Per-target schedule templates (installed as fag_tvm.schedules): the knobs of each target's kernels,
their default heuristics, analytic pruning, the tuner's candidate space and cost-model features.
Modules are imported by their target (fag_tvm.targets.<name>), not here."""
