"""The ascend-like target (a simulated 910B-class AI core), under construction: so far its machine
description (machine.py, machines.json) and the analytic pipeline model its tuner and report use
(pipeline_model.py). It is not registered as a target yet: the kernels, schedule and runner come next."""
