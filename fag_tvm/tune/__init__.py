"""Auto-tuning of a target's shipped kernel knobs with TVM meta-schedule + XGBoost, as single-job modules:

    task        the task identity and the meta-schedule workload stub that carries it
    space       the search space over a target's knob dataclass (sampling, decoding, mutator, postproc)
    cost_model  meta-schedule's XGBoost model on the target's analytic features
    database    reading the family database without TVM; the crash-safe journal
    records     best.json: summaries, choosing a record at build time, stale checks (TVM-free)
    driver      one tuning run: resume, search, confirm
    progress    the progress bar

Measurement comes from the target (Target.make_runner: local, RPC or a model)."""
