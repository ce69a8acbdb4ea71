"""One run on Ray Train: launch (the driver), the per-worker loop, the run's steward actor that drives the
services, the preemption path, resource fitting and the driver's display. Imports services/, core/ and
relay_train; never ops/."""
