"""The ascend-like target (a simulated 910B-class AI core), under construction: so far its machine
description (machine.py, machines.json), the analytic pipeline model its tuner and report use
(pipeline_model.py) and that model's calibration against published forward figures (calibration.py); the
schedule template is schedules/ascend_like.py. It is not registered as a target yet: the kernels and the
tuner's runner come next."""
